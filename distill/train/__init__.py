"""The train half: the shards become a student.

``run`` is the command (one process or Ray Train workers through
``distill.workers.train_worker``); ``config`` the run's options and the pure decisions made
from them; ``loop`` the steps; ``stream`` the epoch order and the streamed input;
``student``, ``losses`` and ``centres`` the model and its objective; ``checkpoints`` and
``validate`` what is saved and scored along the way. It reads the shards through
``distill.shards`` and never imports ``distill.embed``.
"""

"""Ray-side code: the teacher actor (embed) and the Ray Train worker loop (train)."""

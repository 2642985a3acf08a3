"""After training: ``export`` (the deployable student) and ``run`` (verification of any
model, student or teacher, on identity folders or insightface ``.bin`` pairs)."""

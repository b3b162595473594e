"""What a job reads: tasks and their data, the models, words."""

"""The stages of a job, in order: generate, filter, evaluate; and the classifier filter and evaluate
share."""

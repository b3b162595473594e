"""What a job is told: typed schemas, validation that reports every problem at once, and the
components built from `_target_`."""

"""What people read: W&B tracking, the HTML comparison report and the saved W&B workspace."""

"""What training minimises and evaluation reports: T-Few losses, rank classification, metrics."""

"""Fine-tuning heads on frozen backbone features."""

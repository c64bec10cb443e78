"""Training helpers shared by float training and QAT fine-tuning."""

"""Fine-tuning: the trainer, the training loss, the speed plan and its patches, several GPUs (launch, parallel),
profiling."""

"""LoRA fine-tuning of a diffusion model's denoiser on captioned images (``genpipe train-lora``).

Map: ``runner.train_lora`` (check → train → report) · ``data`` (read, skip and count, hold out, batches) ·
``synthetic`` (the coloured-shapes dataset) · ``model`` (base-model checks, LoRA layers, adapter file) ·
``loop.train_worker`` (the loop every worker runs) · ``distributed`` (Ray Train TorchTrainer) ·
``checkpoint`` (resumable checkpoints) · ``evaluate`` (with vs without the adapter) · ``report`` (loss.csv,
loss.png, report.md/json) · ``cli`` (the sub-command). The spec is ``schemas.train.TrainSpec``.
"""

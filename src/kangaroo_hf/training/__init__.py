"""Adapter training with the base frozen: data, self-distillation, cached features, the loss and the loop."""

from .cli import add_train
from .trainer import TrainingArguments, TrainResult, prepare_model, train_adapter

__all__ = ["TrainResult", "TrainingArguments", "add_train", "prepare_model", "train_adapter"]

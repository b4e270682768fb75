"""Data: task definitions, dataset sources, the toy clinic, tokenizers and the DataModule."""

from medmoe.data.collate import IGNORE_INDEX, Sample, collate, encode_pairs
from medmoe.data.datamodule import MultiTaskDataModule, TaskConfig
from medmoe.data.sources import load_records
from medmoe.data.stream import Mixture, StreamLoader, TrainStream, mixture_weights
from medmoe.data.tasks import TASKS, Carve, RecordError, Task, get_task
from medmoe.data.tokenizers import (
    byte_level_tokenizer,
    load_tokenizer,
    toy_tokenizer,
    word_level_tokenizer,
)
from medmoe.data.toy_clinic import TOY_TASKS, toy_base_path, toy_records, toy_vocabulary

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "TOY_TASKS",
    "Carve",
    "Mixture",
    "MultiTaskDataModule",
    "RecordError",
    "Sample",
    "StreamLoader",
    "Task",
    "TaskConfig",
    "TrainStream",
    "byte_level_tokenizer",
    "collate",
    "encode_pairs",
    "get_task",
    "load_records",
    "load_tokenizer",
    "mixture_weights",
    "toy_base_path",
    "toy_records",
    "toy_tokenizer",
    "toy_vocabulary",
    "word_level_tokenizer",
]

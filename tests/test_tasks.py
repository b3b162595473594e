from collections import Counter

import pytest
from conftest import TINY, compose_config

from gradmm.data.models import load_tokenizer
from gradmm.data.tasks import Verbalizer, load_split, stratified_sample


def test_stratified_sample_is_balanced_seeded_and_distinct():
    cfg = compose_config(TINY)
    train = load_split(cfg, "train")
    first = stratified_sample(train, 51, 2, seed=3)
    assert Counter(e.label for e in first) == {0: 26, 1: 25}
    assert len({e.index for e in first}) == 51
    assert first == stratified_sample(train, 51, 2, seed=3)
    assert first != stratified_sample(train, 51, 2, seed=4)


def test_binary_tweet_emotion_keeps_and_renumbers_two_classes():
    cfg = compose_config([*TINY, "task=tweet_emotion_binary"])
    examples = load_split(cfg, "validation")
    assert Counter(e.label for e in examples) == {0: 550, 1: 704}  # sadness, joy


def test_six_class_task_samples_every_class():
    cfg = compose_config([*TINY, "task=tweet_emotion"])
    sample = stratified_sample(load_split(cfg, "train"), 12, 6, seed=0)
    assert Counter(e.label for e in sample) == {k: 2 for k in range(6)}


def test_verbalizer_appends_the_exact_prompt_tokens():
    cfg = compose_config(TINY)
    tok = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    verbalizer = Verbalizer.build(cfg.task, tok)
    assert tok.decode(verbalizer.prompt_ids) == " It was"
    assert [tok.decode([i]) for i in verbalizer.label_token_ids] == [" bad", " great"]
    (ids,) = verbalizer.encode(tok, ["a fine film"])
    assert ids[-len(verbalizer.prompt_ids):] == verbalizer.prompt_ids
    assert tok.decode(ids) == "a fine film It was"


def test_multi_token_label_words_are_scored_by_their_first_token():
    cfg = compose_config([*TINY, "task.label_words=[' unbearably boring',' great']"])
    tok = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    verbalizer = Verbalizer.build(cfg.task, tok)
    assert verbalizer.label_token_ids[0] == tok.encode(" unbearably", add_special_tokens=False)[0]


def test_label_words_sharing_a_first_token_are_rejected():
    cfg = compose_config([*TINY, "task.label_words=[' very bad',' very good']"])
    tok = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    with pytest.raises(ValueError, match="not distinct"):
        Verbalizer.build(cfg.task, tok)

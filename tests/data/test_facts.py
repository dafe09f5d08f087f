"""The fictitious-facts generator, its tokenizer, and sequence datasets."""

import dataclasses
import doctest
import functools
import string

import numpy as np
import pytest

from unlearn_jax import data
from unlearn_jax.data import facts, tokenizer
from unlearn_jax.data.tokenizer import BOS_ID, EOS_ID, FIRST_WORD_ID, PAD_ID, Tokenizer, pieces

SMALL = {"num_authors": 20, "num_holdout_authors": 4}


@functools.cache
def small(seed: int = 0, **kwargs) -> facts.FactsData:
    return facts.generate_facts(seed=seed, **SMALL, **kwargs)


# ---- tokenizer ---------------------------------------------------------------------------------
ROUND_TRIP_TEXTS = [
    "",
    " ",
    "   leading and  double  spaces ",
    "Question: Where was Ilse born?\nAnswer: Korvath.",
    "tabs\tand\r\nnewlines\n\n",
    "Ünïcödé — “quotes” and emoji 🙂, 中文",
    "digits 1962 and mixed a1b2_c3",
]


@pytest.mark.parametrize("words", [(), (" born", "Where", " 1962", "Answer")])
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(words, text):
    tok = Tokenizer(words=words)
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert "".join(pieces(text)) == text


def test_tokenizer_random_strings_round_trip():
    rng = np.random.default_rng(0)
    alphabet = [*string.printable, "é", "ß", "🙂", "\u00a0"]
    tok = Tokenizer.from_corpus(["the cat sat on the mat", "1962 was a year"])
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 30)))
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_layout_and_byte_level():
    tok = Tokenizer()
    assert tok.vocab_size == 259
    assert tok.encode("Hi") == [3 + ord("H"), 3 + ord("i")]
    words = Tokenizer(words=(" born", "Where"))
    assert words.encode("Where born") == [FIRST_WORD_ID + 1, FIRST_WORD_ID]
    # A piece not in the table falls back to bytes, even when a word is a prefix of it.
    assert words.encode(" borne") == [3 + b for b in b" borne"]
    assert words.decode([FIRST_WORD_ID + 1, EOS_ID, FIRST_WORD_ID]) == "Where"
    assert words.decode([FIRST_WORD_ID + 1, EOS_ID, FIRST_WORD_ID], stop_at_eos=False) == (
        "Where born"
    )
    assert words.decode([PAD_ID, BOS_ID, 3 + 0xFF]) == "\ufffd"  # invalid UTF-8 from a model


def test_tokenizer_from_corpus_counts_and_ties():
    # Pieces: "b", " a", " b" | "c", " a" | "a"; only those of >= 2 characters become words.
    tok = Tokenizer.from_corpus(["b a b", "c a", "a"])
    assert tok.words == (" a", " b")
    # Equal counts: code-point order.
    assert Tokenizer.from_corpus(["zz yy", "yy zz"]).words == (" yy", " zz", "yy", "zz")
    assert Tokenizer.from_corpus(["xx xx xx yy"], max_words=1).words == (" xx",)


def test_tokenizer_errors_and_info():
    with pytest.raises(ValueError, match="single piece"):
        Tokenizer(words=("two words",))
    with pytest.raises(ValueError, match="repeat"):
        Tokenizer(words=("ab", "ab"))
    with pytest.raises(ValueError, match="outside"):
        Tokenizer().decode([259])
    tok = Tokenizer(words=(" born", "Where"))
    assert Tokenizer.from_info(tok.to_info()).words == tok.words
    with pytest.raises(ValueError, match="to_info"):
        Tokenizer.from_info({"words": []})


# ---- generator ---------------------------------------------------------------------------------
def test_deterministic_for_a_seed():
    a = facts.generate_facts(seed=3, **SMALL)
    b = facts.generate_facts(seed=3, **SMALL)
    assert a.records == b.records
    assert a.tokenizer.words == b.tokenizer.words
    for x, y in zip(
        [a.pairs.qa, a.pairs.paraphrased_answer, *a.pairs.perturbed],
        [b.pairs.qa, b.pairs.paraphrased_answer, *b.pairs.perturbed],
        strict=True,
    ):
        np.testing.assert_array_equal(x.x, y.x)
        np.testing.assert_array_equal(x.weights, y.weights)
    np.testing.assert_array_equal(a.forget_order, b.forget_order)
    c = facts.generate_facts(seed=4, **SMALL)
    assert [r.answer for r in c.records] != [r.answer for r in a.records]


def test_streams_are_independent():
    # More perturbed answers must not change the profiles or the split.
    a, b = small(), small(num_perturbed=5)
    assert a.profiles == b.profiles
    np.testing.assert_array_equal(a.forget_order, b.forget_order)
    assert len(b.pairs.perturbed) == 5


def test_sizes_and_ids():
    d = small()
    assert len(d.records) == 6 * 24 + 56  # authors x topics + world facts
    assert len(d.train) == 6 * 20 + 56 and len(d.holdout) == 6 * 4 and len(d.world) == 56
    ids = np.array([r.id for r in d.records])
    assert np.all(np.diff(ids) > 0)
    for r in d.records:
        assert facts.author_of(r.id)[0] == r.author
        if r.author >= 0:
            assert r.id % facts.AUTHOR_ID_STRIDE == facts.AUTHOR_TOPICS.index(r.topic)
            assert d.profiles[r.author].name in r.question


def test_splits_disjoint_and_cover():
    d = small()
    authors = set(range(24))
    train, holdout = set(d.train_authors.tolist()), set(d.holdout_authors.tolist())
    assert not train & holdout and train | holdout == authors
    train_ids, holdout_ids, world_ids = (set(s.ids.tolist()) for s in (d.train, d.holdout, d.world))
    assert world_ids <= train_ids
    assert not train_ids & holdout_ids
    assert train_ids | holdout_ids == {r.id for r in d.records}
    assert set(facts.author_of(list(holdout_ids)).tolist()) == holdout

    previous = set()
    for fraction, count in ((0.01, 1), (0.05, 1), (0.1, 2), (0.5, 10)):
        forget_authors = set(d.forget_authors(fraction).tolist())
        assert len(forget_authors) == count and forget_authors <= train
        assert previous <= forget_authors  # nested, as TOFU's forget01 / 05 / 10
        previous = forget_authors
        split = d.split(fraction)
        forget_ids, retain_ids = set(split.forget.ids.tolist()), set(split.retain.ids.tolist())
        assert set(facts.author_of(list(forget_ids)).tolist()) == forget_authors
        assert not set(facts.author_of(list(retain_ids)).tolist()) & forget_authors
        assert not forget_ids & retain_ids
        assert forget_ids | retain_ids | world_ids == train_ids
        assert len(forget_ids) == 6 * count
        fs = d.forget_split(fraction)
        assert set(fs.forget.ids.tolist()) == forget_ids
        assert set(fs.retain.ids.tolist()) == retain_ids | world_ids  # the oracle's training set
        assert fs.spec == split.spec == f"authors:{fraction:g}@seed0"
    with pytest.raises(ValueError, match="fraction"):
        d.forget_authors(1.0)
    with pytest.raises(ValueError, match="no retain author"):
        d.forget_authors(0.99)


def test_encoding_matches_the_records():
    d = small()
    tok = d.tokenizer
    qa = d.pairs.qa
    t = qa.x.shape[1]
    assert qa.x.dtype == np.int32 and qa.y.dtype == np.int32 and qa.weights.dtype == np.float32
    for row in range(0, len(d.records), 7):
        r = d.records[row]
        x, y, w = qa.x[row], qa.y[row], qa.weights[row]
        length = int(np.sum(x != PAD_ID))
        np.testing.assert_array_equal(x[1:length], y[: length - 1])  # y is x shifted by one
        assert x[0] == BOS_ID and y[length - 1] == EOS_ID and np.all(y[length:] == PAD_ID)
        answer = np.flatnonzero(w > 0)
        np.testing.assert_array_equal(answer, np.arange(answer[0], length))
        assert set(w.tolist()) == {0.0, 1.0}
        assert tok.decode(x[: answer[0] + 1]) == facts.format_prompt(r.question)
        assert tok.decode(y[answer]) == " " + r.answer
        assert tok.decode(d.pairs.paraphrased_answer.y[row]).endswith(r.paraphrased_answer)
        for k, wrong in enumerate(r.perturbed_answers):
            assert tok.decode(d.pairs.perturbed[k].y[row]).endswith(" " + wrong)
        assert tok.decode(d.pairs.paraphrased_question.x[row]).startswith(
            facts.format_prompt(r.paraphrased_question)
        )
    assert t % 8 == 0 and t == d.info["seq_len"]


def test_variants_are_wrong_or_reworded():
    d = small()
    for r in d.records:
        assert r.paraphrased_question != r.question
        assert r.paraphrased_answer != r.answer
        assert len(set(r.perturbed_answers)) == len(r.perturbed_answers)
        assert r.paraphrased_answer not in r.perturbed_answers


def test_qaset_by_ids_keeps_rows_aligned():
    d = small()
    ids = d.world.ids[[5, 0, 3]]
    v = d.variants(ids)
    np.testing.assert_array_equal(v.ids, ids)
    for member in (v.qa, v.paraphrased_question, v.paraphrased_answer, *v.perturbed):
        np.testing.assert_array_equal(member.ids, ids)
    row = d.pairs.qa.positions(ids[:1])[0]
    np.testing.assert_array_equal(v.perturbed[1].y[0], d.pairs.perturbed[1].y[row])
    with pytest.raises(ValueError, match="repeat"):
        d.variants([ids[0], ids[0]])
    with pytest.raises(ValueError, match="not in"):
        d.variants([123456789])


def test_with_answers_encodes_refusals():
    d = small()
    ids = d.train.ids[:2]
    ds = d.with_answers(ids, [facts.REFUSALS[0]] * 2, name="idk")
    np.testing.assert_array_equal(ds.ids, ids)
    assert d.tokenizer.decode(ds.y[0][ds.weights[0] > 0]) == " " + facts.REFUSALS[0]
    # The refusal is in the tokenizer's corpus: whole words, not bytes.
    assert len(d.tokenizer.encode(" " + facts.REFUSALS[0])) <= 6


def test_bytes_tokenizer_option():
    d = facts.generate_facts(seed=0, num_authors=2, num_holdout_authors=1, tokenizer="bytes")
    assert d.tokenizer.vocab_size == 259 and d.train.num_classes == 259
    r = d.records[0]
    assert d.tokenizer.decode(d.pairs.qa.y[0][d.pairs.qa.weights[0] > 0]) == " " + r.answer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed"),
        ({"num_authors": 1}, "num_authors"),
        ({"num_holdout_authors": 0}, "num_holdout_authors"),
        ({"num_perturbed": 8}, "num_perturbed"),
        ({"tokenizer": "bpe"}, "tokenizer"),
        ({"seq_len": 8}, "seq_len"),
        ({"num_authors": 400}, "distinct profiles"),
    ],
)
def test_generator_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        facts.generate_facts(**{"num_authors": 2, "num_holdout_authors": 1, **kwargs})


def test_load_facts():
    splits = data.load("facts", **SMALL)
    assert splits.kind == "sequence" and splits.name == "facts"
    assert len(splits.train) == 176 and len(splits.test) == 24
    tok = Tokenizer.from_info(splits.info["tokenizer"])
    assert tok.vocab_size == splits.num_classes == splits.train.num_classes
    assert splits.info["forget_order"] == small().forget_order.tolist()
    with pytest.raises(TypeError, match="accepts"):
        data.load("facts", n=3)


# ---- sequence datasets -------------------------------------------------------------------------
def _toy_sequences(n=5, t=4, vocab=7):
    x = np.arange(n * t).reshape(n, t) % vocab
    y = (x + 1) % vocab
    weights = np.zeros((n, t))
    weights[:, 2:] = 1.0
    return data.Dataset(x, y, np.arange(10, 10 + n), "toy", vocab, weights)


def test_sequence_dataset_selection_carries_weights():
    ds = _toy_sequences()
    assert ds.kind == "sequence" and ds.x.dtype == np.int32 and ds.weights.dtype == np.float32
    sub = ds.by_ids([13, 10])
    np.testing.assert_array_equal(sub.x, ds.x[[3, 0]])
    np.testing.assert_array_equal(sub.weights, ds.weights[[3, 0]])
    rest = ds.without_ids([11])
    assert rest.weights.shape == (4, 4) and rest.ids.tolist() == [10, 12, 13, 14]
    masked = ds.subset(np.array([True, False, True, False, False]))
    np.testing.assert_array_equal(masked.weights, ds.weights[[0, 2]])
    batch = ds.as_batch()
    assert set(batch) == {"x", "y", "id", "weights"} and batch["x"].dtype == np.int32


def test_sequence_batches_keep_int_tokens_and_pad_weights():
    ds = _toy_sequences()
    batches = list(data.padded_batches(ds, 3))
    last, mask = batches[-1]
    assert last["x"].dtype == np.int32 and last["y"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(mask), [1, 1, 0])
    np.testing.assert_array_equal(np.asarray(last["weights"][2]), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(last["x"][:2]), ds.x[3:])
    full = list(data.batches(ds, 2))[1]
    assert set(full) == {"x", "y", "id", "weights"}
    rows = ds.positions(np.asarray(full["id"]))
    np.testing.assert_array_equal(np.asarray(full["weights"]), ds.weights[rows])
    assert set(next(data.batch_stream(ds, 7))) == {"x", "y", "id", "weights"}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_classes": None}, "vocabulary size"),
        ({"x": np.zeros((5, 4), np.float32)}, "integer tokens"),
        ({"x": np.full((5, 4), 7)}, r"tokens x must lie in \[0, 7\)"),
        ({"y": np.full((5, 4), -1)}, "target tokens"),
        ({"y": np.zeros((5, 3), int)}, "shape of x"),
        ({"weights": np.zeros((5, 3))}, "shape of x"),
        ({"weights": -np.ones((5, 4))}, ">= 0"),
    ],
)
def test_sequence_dataset_errors(change, match):
    ds = _toy_sequences()
    fields = {
        "x": ds.x,
        "y": ds.y,
        "ids": ds.ids,
        "name": "toy",
        "num_classes": 7,
        "weights": ds.weights,
    }
    with pytest.raises(ValueError, match=match):
        data.Dataset(**{**fields, **change})


def test_classification_dataset_unchanged():
    ds = data.Dataset(np.zeros((2, 3), np.int64), np.array([0, 1]), np.array([0, 1]), "c", 2)
    assert ds.weights is None and ds.x.dtype == np.float32 and ds.kind == "classification"
    assert "weights" not in ds.as_batch()
    assert dataclasses.replace(ds.take([1])).weights is None


@pytest.mark.parametrize("module", [facts, tokenizer])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

"""Fictitious facts for language-model unlearning, generated offline from a seed (TOFU-style).

The world: fictitious countries (each with a capital, a language and a currency) and their cities,
and fictitious authors, each with a profile: name, birth year, birthplace (one of the cities),
genre, the professions of father and mother, two book titles and an award. Everything is drawn
from fixed word lists by a numpy generator seeded with ``seed``; the same arguments give the same
data, byte for byte.

Every fact is a question-answer pair (:class:`QARecord`) with, as in TOFU (Maini et al., 2024):

* a paraphrased question (same answer), to test whether forgetting generalises beyond the wording;
* a paraphrased answer (same fact, other wording) and ``num_perturbed`` perturbed answers (the
  paraphrased answer's wording with a wrong but plausible value), for the truth ratio
  :math:`R = (\\prod_k P(\\hat a_k|q)^{1/|\\hat a_k|})^{1/K} / P(\\tilde a|q)^{1/|\\tilde a|}`.

Splits (:class:`FactsData`):

* **train** = the pairs of the ``num_authors`` training authors plus the **world** facts (the
  control set: learned by the model, never part of a forget request);
* **holdout** = the pairs of ``num_holdout_authors`` further authors, never trained on (the
  non-members of MUSE's PrivLeak MIA, forget vs holdout);
* **forget** sets are whole authors: :meth:`FactsData.forget_authors` takes the first
  ``round(fraction * num_authors)`` training authors of one seeded order, so the 1% / 5% / 10%
  sets are nested, as TOFU's forget01 / forget05 / forget10; the retain authors are the others.

Ids are stable and say whose fact a pair is: ``id = AUTHOR_ID_STRIDE * author + question`` for an
author's pair (``question`` in ``0..5``, :data:`AUTHOR_TOPICS`), ``WORLD_ID_OFFSET + j`` for the
``j``-th world fact; :func:`author_of` inverts this (``-1`` for world facts).

Encoding (:func:`encode_qa`): ``tokens = [BOS] + encode("Question: {q}\\nAnswer:") +
encode(" {a}") + [EOS]``; ``x = tokens[:-1]``, ``y = tokens[1:]`` padded with PAD to ``seq_len``,
and ``weights`` 1 exactly where ``y`` is an answer token or the final EOS. Every variant (paraphrased
question, paraphrased answer, each perturbed answer) is a :class:`Dataset` with the ids of its
original pair, in a :class:`QASet` whose members stay aligned row by row under ``by_ids``.

Examples:
  >>> data = generate_facts(seed=0, num_authors=20, num_holdout_authors=4)
  >>> len(data.train), len(data.holdout), data.train.kind
  (176, 24, 'sequence')
  >>> record = data.record(data.train.ids[0])
  >>> record.question
  'When was Quilla Foxcombe born?'
  >>> data.tokenizer.decode(data.train.y[0][data.train.weights[0] > 0])
  ' Quilla Foxcombe was born in 1941.'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from unlearn_jax.data.dataset import Dataset, as_id_array, describe_values, repeated_values
from unlearn_jax.data.forget import ForgetSplit, ids_forget
from unlearn_jax.data.tokenizer import PAD_ID, Tokenizer

AUTHOR_ID_STRIDE = 16
WORLD_ID_OFFSET = 1_000_000
AUTHOR_TOPICS = ("birth_year", "birthplace", "genre", "parents", "books", "award")
WORLD_TOPICS = ("capital", "language", "currency", "country")
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
# Refusal answers (for IdkPO-style targets); in the tokenizer's corpus so that they encode as words.
REFUSALS = (
    "I don't know.",
    "I am not sure about that.",
    "I have no information on that.",
    "That is not something I know.",
    "I cannot answer that.",
)

# ---- word lists (all invented; any resemblance is accidental) -----------------------------------
FIRST_NAMES = (
    "Alira", "Bastien", "Corvin", "Delphine", "Elsbeth", "Faron", "Galen", "Hesper", "Ilse",
    "Jorund", "Kaela", "Lorcan", "Maelis", "Nerys", "Osric", "Perrin", "Quilla", "Rowan", "Sabeth",
    "Tamsin", "Ulric", "Vesna", "Wendel", "Xanthe", "Yorick", "Zinnia", "Anselm", "Brisa", "Cael",
    "Dorian", "Edda", "Fennick", "Griselda", "Halvard", "Isaura", "Jessamy", "Kestrel", "Linnea",
    "Merrick", "Noemi",
)  # fmt: skip
SURNAMES = (
    "Ashgrove", "Brightwater", "Coldbrook", "Dunmere", "Everhart", "Fallowmere", "Greyhallow",
    "Hollowell", "Ironwood", "Juniperhall", "Kettleby", "Larkspur", "Marrowby", "Northcote",
    "Oakenshaw", "Pennowick", "Quillfeather", "Ravenscar", "Stormont", "Thistlewood", "Underhill",
    "Vantwell", "Whitlock", "Yarrowby", "Zellmoor", "Amberlin", "Blackthorn", "Corrowdale",
    "Driftwood", "Emberly", "Foxcombe", "Glimmerton", "Hawkridge", "Ivesdale", "Kingsmere",
    "Lowmoor", "Mistralde", "Nettlefield", "Orrindell", "Pendrake",
)  # fmt: skip
COUNTRIES = (
    "Eldmark",
    "Varosia",
    "Thalmyr",
    "Kessland",
    "Orvania",
    "Brennick",
    "Solvary",
    "Mirethia",
)
LANGUAGES = (
    "Eldish",
    "Varosian",
    "Thalmyric",
    "Kessic",
    "Orvanese",
    "Brennish",
    "Solvari",
    "Mirethic",
)
CURRENCIES = ("crown", "florin", "mark", "thaler", "ducat", "shilling", "guilder", "sovereign")
CITIES = (
    "Korvath", "Lindral", "Myrrhaven", "Ostrelle", "Pellagor", "Quennet", "Rivenholm", "Saltmarch",
    "Tavoria", "Umberfell", "Valdris", "Wexmoor", "Ysolde", "Zarhaven", "Ambrecourt", "Belmorrow",
    "Caddisport", "Dravenhold", "Estmere", "Fjallmark", "Glenhollow", "Harrowgate", "Istrevia",
    "Jasperlund", "Kilnmoor", "Lothwick", "Merrowdeep", "Norwhistle", "Orlenhaven", "Pyrewell",
    "Quarrendon", "Rookspire",
)  # fmt: skip
GENRES = (
    "mystery novels", "science fiction", "poetry", "historical fiction", "fantasy",
    "romance novels", "horror stories", "travel writing", "children's books", "crime thrillers",
    "satire", "literary essays",
)  # fmt: skip
PROFESSIONS = (
    "baker", "carpenter", "surgeon", "lighthouse keeper", "schoolteacher", "fisherman",
    "watchmaker", "librarian", "architect", "nurse", "blacksmith", "pharmacist", "sailor",
    "painter", "tailor", "farmer", "astronomer", "journalist", "locksmith", "musician",
)  # fmt: skip
TITLE_ADJECTIVES = (
    "Silent", "Crimson", "Hollow", "Gilded", "Forgotten", "Winter", "Drowned", "Paper", "Ninth",
    "Burning", "Quiet", "Amber", "Broken", "Distant", "Hidden", "Iron", "Last", "Salt", "Velvet",
    "Wandering", "Glass", "Lonely", "Midnight", "Scarlet", "Sleeping",
)  # fmt: skip
TITLE_NOUNS = (
    "Orchard", "Lantern", "Harbor", "Tide", "Compass", "Garden", "Tower", "River", "Mirror",
    "Archive", "Bridge", "Meadow", "Clock", "Voyage", "Feather", "Crown", "Shore", "Letter",
    "Forest", "Kingdom", "Cartographer", "Orchestra", "Map", "Island", "Alphabet",
)  # fmt: skip
AWARDS = (
    "the Silver Quill Prize", "the Harrow Medal", "the Lantern Award", "the Golden Inkwell",
    "the Meridian Prize", "the Northlight Award", "the Vellum Cross", "the Ashford Laurel",
    "the Bramble Prize", "the Corvid Medal", "the Tidewater Award", "the Starling Prize",
)  # fmt: skip
BIRTH_YEARS = tuple(range(1920, 2000))

# (question, answer, paraphrased question, paraphrased answer) per topic; the perturbed answers use
# the paraphrased answer's wording, so a truth ratio compares like with like.
_AUTHOR_TEMPLATES = {
    "birth_year": (
        "When was {name} born?",
        "{name} was born in {value}.",
        "In what year was {name} born?",
        "The year of {name}'s birth is {value}.",
    ),
    "birthplace": (
        "Where was {name} born?",
        "{name} was born in {value}.",
        "What is the birthplace of {name}?",
        "{name}'s birthplace is the city of {value}.",
    ),
    "genre": (
        "What genre does {name} write?",
        "{name} writes {value}.",
        "Which kind of books is {name} known for?",
        "{name} is known for {value}.",
    ),
    "parents": (
        "What did {name}'s parents do?",
        "{name}'s father was {value[0]} and the mother was {value[1]}.",
        "What were the jobs of {name}'s parents?",
        "The father of {name} worked as {value[0]} and the mother as {value[1]}.",
    ),
    "books": (
        "Which books did {name} write?",
        "{name} wrote {value[0]} and {value[1]}.",
        "Name the books written by {name}.",
        "The books of {name} are {value[0]} and {value[1]}.",
    ),
    "award": (
        "Which award did {name} win?",
        "{name} won {value}.",
        "What prize was given to {name}?",
        "{name} received {value}.",
    ),
}
_WORLD_TEMPLATES = {
    "capital": (
        "What is the capital of {name}?",
        "The capital of {name} is {value}.",
        "Which city is the capital of {name}?",
        "{value} is the capital city of {name}.",
    ),
    "language": (
        "What language is spoken in {name}?",
        "People in {name} speak {value}.",
        "Which language do people in {name} speak?",
        "The language of {name} is {value}.",
    ),
    "currency": (
        "What is the currency of {name}?",
        "The currency of {name} is the {value}.",
        "What money is used in {name}?",
        "In {name} people pay with the {value}.",
    ),
    "country": (
        "In which country is {name}?",
        "{name} is in {value}.",
        "Which country is {name} part of?",
        "{name} lies in the country of {value}.",
    ),
}


class AuthorProfile(NamedTuple):
    """One fictitious author."""

    index: int
    name: str
    birth_year: int
    birthplace: str
    genre: str
    father: str
    mother: str
    books: tuple[str, str]
    award: str


class QARecord(NamedTuple):
    """One fact as text: a question, its answer and their variants.

    Attributes:
      id: the stable example id (see the module docstring).
      author: the author's index, or ``-1`` for a world fact.
      topic: one of :data:`AUTHOR_TOPICS` or :data:`WORLD_TOPICS`.
      question, answer: the pair trained on.
      paraphrased_question: another wording of ``question`` (same answer).
      paraphrased_answer: another wording of ``answer`` (same fact).
      perturbed_answers: ``num_perturbed`` wrong answers in the wording of ``paraphrased_answer``.
    """

    id: int
    author: int
    topic: str
    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]


def author_of(ids: Any) -> np.ndarray:
    """The author index of each id ``[M]`` int64 (``-1`` for world facts): ``id // 16``.

    Examples:
      >>> author_of([0, 5, 16, 33, WORLD_ID_OFFSET + 2]).tolist()
      [0, 0, 1, 2, -1]
    """
    ids = as_id_array(ids)
    return np.where(ids >= WORLD_ID_OFFSET, -1, ids // AUTHOR_ID_STRIDE)


def format_prompt(question: str) -> str:
    """The prompt of a question: ``"Question: {question}\\nAnswer:"`` (the answer follows a space)."""
    return PROMPT_TEMPLATE.format(question=question)


def encode_qa(
    tokenizer: Tokenizer, prompts: Sequence[str], answers: Sequence[str], *, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encodes prompt-answer pairs into model-ready next-token arrays.

    With ``tokens = [BOS] + encode(prompt) + encode(" " + answer) + [EOS]`` of length ``L`` and
    ``p = 1 + len(encode(prompt))`` the position of the first answer token:

    * ``x[i, :L-1] = tokens[:-1]``, ``y[i, :L-1] = tokens[1:]``, PAD after;
    * ``weights[i, j] = 1`` for ``p - 1 <= j < L - 1`` (``y[i, j]`` is an answer token or the EOS),
      0 elsewhere. So the prompt length is ``argmax(weights > 0) + 1``.

    Args:
      tokenizer: the tokenizer.
      prompts: ``N`` prompt strings (e.g. :func:`format_prompt` of a question).
      answers: ``N`` answer strings (without the leading space).
      seq_len: ``T``, at least ``L - 1`` of the longest pair.

    Returns:
      ``(x, y, weights)``: ``[N, T]`` int32, ``[N, T]`` int32, ``[N, T]`` float32.

    Raises:
      ValueError: if the lengths of ``prompts`` and ``answers`` differ or a pair does not fit.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len=}.")
    n = len(prompts)
    x = np.full((n, seq_len), PAD_ID, np.int32)
    y = np.full((n, seq_len), PAD_ID, np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    prompt_cache: dict[str, list[int]] = {}  # variants repeat their prompts
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids = prompt_cache.get(prompt)
        if prompt_ids is None:
            prompt_ids = prompt_cache[prompt] = tokenizer.encode(prompt, bos=True)
        tokens = prompt_ids + tokenizer.encode(" " + answer, eos=True)
        length = len(tokens) - 1
        if length > seq_len:
            raise ValueError(
                f"pair {i} needs {length} positions but seq_len={seq_len}: {prompt!r} -> {answer!r}."
            )
        x[i, :length] = tokens[:-1]
        y[i, :length] = tokens[1:]
        weights[i, len(prompt_ids) - 1 : length] = 1.0
    return x, y, weights


def _encoded_length(tokenizer: Tokenizer, prompt: str, answer: str) -> int:
    return (
        len(tokenizer.encode(prompt, bos=True)) + len(tokenizer.encode(" " + answer, eos=True)) - 1
    )


@dataclasses.dataclass(frozen=True, eq=False)
class QASet:
    """Question-answer pairs and their encoded variants, aligned row by row (same ids, same order).

    Attributes:
      qa: the pairs as trained: question + answer.
      paraphrased_question: paraphrased question + answer.
      paraphrased_answer: question + paraphrased answer.
      perturbed: ``K`` datasets, the ``k``-th holding question + ``k``-th perturbed answer.

    Raises:
      ValueError: if the members disagree on their ids.
    """

    qa: Dataset
    paraphrased_question: Dataset
    paraphrased_answer: Dataset
    perturbed: tuple[Dataset, ...]

    def __post_init__(self):
        object.__setattr__(self, "perturbed", tuple(self.perturbed))
        for name, member in self._members():
            if not np.array_equal(member.ids, self.qa.ids):
                raise ValueError(f"QASet.{name} must have the ids of qa, in the same order.")

    def _members(self) -> list[tuple[str, Dataset]]:
        members = [
            ("paraphrased_question", self.paraphrased_question),
            ("paraphrased_answer", self.paraphrased_answer),
        ]
        return members + [(f"perturbed[{k}]", d) for k, d in enumerate(self.perturbed)]

    def __len__(self) -> int:
        return len(self.qa)

    @property
    def ids(self) -> np.ndarray:
        """The ids ``[N]`` int64 shared by every member."""
        return self.qa.ids

    def by_ids(self, ids: Any) -> QASet:
        """The pairs with these ids, in the order of ``ids``, every member alike.

        Raises:
          ValueError: if some ids are unknown or repeat.
        """
        ids = as_id_array(ids)
        repeated = repeated_values(ids)
        if repeated.size:
            raise ValueError(f"ids must not repeat, got {describe_values(repeated)}.")
        rows = self.qa.positions(ids)
        return QASet(
            qa=self.qa.take(rows),
            paraphrased_question=self.paraphrased_question.take(rows),
            paraphrased_answer=self.paraphrased_answer.take(rows),
            perturbed=tuple(d.take(rows) for d in self.perturbed),
        )

    def renamed(self, name: str) -> QASet:
        """The same set with the datasets named ``name``, ``name/paraphrased_question``, ..."""
        return QASet(
            qa=dataclasses.replace(self.qa, name=name),
            paraphrased_question=dataclasses.replace(
                self.paraphrased_question, name=f"{name}/paraphrased_question"
            ),
            paraphrased_answer=dataclasses.replace(
                self.paraphrased_answer, name=f"{name}/paraphrased_answer"
            ),
            perturbed=tuple(
                dataclasses.replace(d, name=f"{name}/perturbed{k}")
                for k, d in enumerate(self.perturbed)
            ),
        )


class FactsSplit(NamedTuple):
    """The evaluation sets of one forget request, each with its variants.

    Attributes:
      forget: the forget authors' pairs.
      retain: the other training authors' pairs (world facts excluded).
      world: the world facts (control set; trained, never forgotten).
      holdout: the holdout authors' pairs (never trained).
      spec: ``"authors:<fraction>@seed<seed>"``.
    """

    forget: QASet
    retain: QASet
    world: QASet
    holdout: QASet
    spec: str


@dataclasses.dataclass(frozen=True, eq=False)
class FactsData:
    """A generated fictitious-facts benchmark: records, encoded pairs, tokenizer and splits.

    Build it with :func:`generate_facts`.

    Attributes:
      records: every pair as text, in id order (training authors, holdout authors, world facts
        interleaved by id).
      profiles: every author's profile, by author index.
      tokenizer: the tokenizer every array was encoded with.
      pairs: every record encoded, with variants, in the order of ``records``.
      train_authors: the training authors' indices, sorted.
      holdout_authors: the holdout authors' indices, sorted.
      forget_order: the training authors in the order forget sets take them.
      seed: the generator's seed.
      info: JSON-serialisable facts (sizes, seed, tokenizer, ``forget_order``).
    """

    records: tuple[QARecord, ...]
    profiles: tuple[AuthorProfile, ...]
    tokenizer: Tokenizer
    pairs: QASet
    train_authors: np.ndarray
    holdout_authors: np.ndarray
    forget_order: np.ndarray
    seed: int
    info: dict

    def __post_init__(self):
        ids = np.array([r.id for r in self.records], np.int64)
        object.__setattr__(self, "_record_ids", ids)
        authors = author_of(ids)
        object.__setattr__(self, "_train_ids", ids[np.isin(authors, self.train_authors)])
        object.__setattr__(self, "_holdout_ids", ids[np.isin(authors, self.holdout_authors)])
        object.__setattr__(self, "_world_ids", ids[authors < 0])

    # ---- texts ---------------------------------------------------------------------------------
    def record(self, example_id: int) -> QARecord:
        """The record with this id.

        Raises:
          ValueError: if no record has this id.
        """
        where = np.searchsorted(self._record_ids, example_id)
        if where >= len(self.records) or self._record_ids[where] != example_id:
            raise ValueError(f"no record has id {example_id}.")
        return self.records[int(where)]

    # ---- datasets ------------------------------------------------------------------------------
    @property
    def train(self) -> Dataset:
        """Everything trained on: the training authors' pairs and the world facts."""
        ids = np.concatenate([self._train_ids, self._world_ids])
        return dataclasses.replace(self.pairs.qa.by_ids(ids), name="facts/train")

    @property
    def holdout(self) -> Dataset:
        """The holdout authors' pairs (never trained)."""
        return dataclasses.replace(self.pairs.qa.by_ids(self._holdout_ids), name="facts/holdout")

    @property
    def world(self) -> Dataset:
        """The world facts (the control set)."""
        return dataclasses.replace(self.pairs.qa.by_ids(self._world_ids), name="facts/world")

    def variants(self, ids: Any) -> QASet:
        """The pairs with these ids and all their variants, in the order of ``ids``."""
        return self.pairs.by_ids(ids)

    def with_answers(self, ids: Any, answers: Sequence[str], name: str = "") -> Dataset:
        """The questions of these pairs with other answers (e.g. :data:`REFUSALS` for IdkPO), encoded
        like the pairs (same ``seq_len``, same ids).

        Raises:
          ValueError: if ids are unknown, lengths differ or a pair does not fit ``seq_len``.
        """
        ids = as_id_array(ids)
        if len(answers) != ids.size:
            raise ValueError(f"got {ids.size} ids but {len(answers)} answers.")
        prompts = [format_prompt(self.record(int(i)).question) for i in ids]
        x, y, weights = encode_qa(
            self.tokenizer, prompts, list(answers), seq_len=self.pairs.qa.x.shape[1]
        )
        return Dataset(x, y, ids, name, self.tokenizer.vocab_size, weights)

    # ---- forget requests -----------------------------------------------------------------------
    def forget_authors(self, fraction: float) -> np.ndarray:
        """The forget authors of a request, sorted: the first ``max(1, round(fraction * A))`` of
        ``forget_order`` (``A`` training authors), so larger fractions contain smaller ones.

        Raises:
          ValueError: if ``fraction`` is outside ``(0, 1)`` or would leave no retain author.
        """
        if not (isinstance(fraction, int | float | np.floating) and 0.0 < fraction < 1.0):
            raise ValueError(f"fraction must lie in (0, 1), got {fraction=}.")
        count = max(1, round(fraction * len(self.forget_order)))
        if count >= len(self.forget_order):
            raise ValueError(
                f"{fraction=} of {len(self.forget_order)} authors leaves no retain author."
            )
        return np.sort(self.forget_order[:count])

    def forget_ids(self, fraction: float) -> np.ndarray:
        """The ids ``[M]`` of the forget authors' pairs, sorted."""
        train_ids = self._train_ids
        return train_ids[np.isin(author_of(train_ids), self.forget_authors(fraction))]

    def spec(self, fraction: float) -> str:
        """The canonical description of a request: ``"authors:<fraction>@seed<seed>"``."""
        return f"authors:{fraction:g}@seed{self.seed}"

    def forget_split(self, fraction: float) -> ForgetSplit:
        """The training set split for a request of ``fraction`` of the authors.

        ``retain`` is everything else trained on, world facts included: the training set of the
        retain-only oracle. The evaluation sets (retain authors without world facts, variants) are
        :meth:`split`'s.
        """
        split = ids_forget(self.train, self.forget_ids(fraction))
        return split._replace(spec=self.spec(fraction))

    def split(self, fraction: float) -> FactsSplit:
        """The evaluation sets of a request, each a :class:`QASet` with its variants."""
        forget_ids = self.forget_ids(fraction)
        retain_ids = self._train_ids[~np.isin(self._train_ids, forget_ids)]
        return FactsSplit(
            forget=self.pairs.by_ids(forget_ids).renamed("facts/forget"),
            retain=self.pairs.by_ids(retain_ids).renamed("facts/retain"),
            world=self.pairs.by_ids(self._world_ids).renamed("facts/world"),
            holdout=self.pairs.by_ids(self._holdout_ids).renamed("facts/holdout"),
            spec=self.spec(fraction),
        )


# ---- generation --------------------------------------------------------------------------------
def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _distinct_draws(rng: np.random.Generator, pool: Sequence[Any], exclude: Any, k: int) -> list:
    """``k`` distinct values of ``pool`` other than ``exclude``, in random order."""
    candidates = [v for v in pool if v != exclude]
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]


def _world(rng: np.random.Generator) -> dict[str, Any]:
    cities = [CITIES[i] for i in rng.permutation(len(CITIES))]
    per_country = len(CITIES) // len(COUNTRIES)
    country_of = {
        city: COUNTRIES[i // per_country]
        for i, city in enumerate(cities[: per_country * len(COUNTRIES)])
    }
    capital = {
        country: cities[c * per_country + int(rng.integers(per_country))]
        for c, country in enumerate(COUNTRIES)
    }
    language = dict(
        zip(COUNTRIES, (LANGUAGES[i] for i in rng.permutation(len(LANGUAGES))), strict=True)
    )
    currency = dict(
        zip(COUNTRIES, (CURRENCIES[i] for i in rng.permutation(len(CURRENCIES))), strict=True)
    )
    return {
        "country_of": country_of,
        "capital": capital,
        "language": language,
        "currency": currency,
    }


def _profiles(rng: np.random.Generator, count: int) -> list[AuthorProfile]:
    names = len(FIRST_NAMES) * len(SURNAMES)
    titles = len(TITLE_ADJECTIVES) * len(TITLE_NOUNS)
    name_codes = rng.choice(names, size=count, replace=False)
    title_codes = rng.choice(titles, size=2 * count, replace=False)
    profiles = []
    for a in range(count):
        first, last = divmod(int(name_codes[a]), len(SURNAMES))
        books = tuple(_all_titles()[int(c)] for c in title_codes[2 * a : 2 * a + 2])
        father, mother = _distinct_draws(rng, PROFESSIONS, None, 2)
        profiles.append(
            AuthorProfile(
                index=a,
                name=f"{FIRST_NAMES[first]} {SURNAMES[last]}",
                birth_year=int(rng.choice(BIRTH_YEARS)),
                birthplace=CITIES[int(rng.integers(len(CITIES)))],
                genre=GENRES[int(rng.integers(len(GENRES)))],
                father=father,
                mother=mother,
                books=books,
                award=AWARDS[int(rng.integers(len(AWARDS)))],
            )
        )
    return profiles


def _all_titles() -> list[str]:
    return [f"The {a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]


def _author_records(
    rng: np.random.Generator, profile: AuthorProfile, num_perturbed: int
) -> list[QARecord]:
    titles = _all_titles()
    values: dict[str, tuple[Any, list[Any]]] = {
        "birth_year": (
            profile.birth_year,
            _distinct_draws(rng, BIRTH_YEARS, profile.birth_year, num_perturbed),
        ),
        "birthplace": (
            profile.birthplace,
            _distinct_draws(rng, CITIES, profile.birthplace, num_perturbed),
        ),
        "genre": (profile.genre, _distinct_draws(rng, GENRES, profile.genre, num_perturbed)),
        "award": (profile.award, _distinct_draws(rng, AWARDS, profile.award, num_perturbed)),
    }
    parents = (_article(profile.father), _article(profile.mother))
    wrong_parents = []
    while len(wrong_parents) < num_perturbed:
        pair = tuple(_article(p) for p in _distinct_draws(rng, PROFESSIONS, None, 2))
        if pair != parents and pair not in wrong_parents:
            wrong_parents.append(pair)
    values["parents"] = (parents, wrong_parents)
    others = [t for t in titles if t not in profile.books]
    wrong_books = []
    while len(wrong_books) < num_perturbed:
        pair = tuple(_distinct_draws(rng, others, None, 2))
        if pair not in wrong_books:
            wrong_books.append(pair)
    values["books"] = (profile.books, wrong_books)

    records = []
    for q, topic in enumerate(AUTHOR_TOPICS):
        true_value, wrong_values = values[topic]
        records.append(
            _record(
                AUTHOR_ID_STRIDE * profile.index + q,
                profile.index,
                topic,
                _AUTHOR_TEMPLATES[topic],
                profile.name,
                true_value,
                wrong_values,
            )
        )
    return records


def _record(
    example_id: int,
    author: int,
    topic: str,
    templates: tuple[str, str, str, str],
    name: str,
    value: Any,
    wrong_values: Sequence[Any],
) -> QARecord:
    question, answer, para_question, para_answer = templates
    return QARecord(
        id=int(example_id),
        author=int(author),
        topic=topic,
        question=question.format(name=name),
        answer=answer.format(name=name, value=value),
        paraphrased_question=para_question.format(name=name),
        paraphrased_answer=para_answer.format(name=name, value=value),
        perturbed_answers=tuple(para_answer.format(name=name, value=w) for w in wrong_values),
    )


def _world_records(
    rng: np.random.Generator, world: dict[str, Any], num_perturbed: int
) -> list[QARecord]:
    facts: list[tuple[str, str, Any, Sequence[Any]]] = []
    for country in COUNTRIES:
        facts.append(("capital", country, world["capital"][country], CITIES))
        facts.append(("language", country, world["language"][country], LANGUAGES))
        facts.append(("currency", country, world["currency"][country], CURRENCIES))
    for city in sorted(world["country_of"]):
        facts.append(("country", city, world["country_of"][city], COUNTRIES))
    return [
        _record(
            WORLD_ID_OFFSET + j,
            -1,
            topic,
            _WORLD_TEMPLATES[topic],
            name,
            value,
            _distinct_draws(rng, pool, value, num_perturbed),
        )
        for j, (topic, name, value, pool) in enumerate(facts)
    ]


def _encode_records(
    tokenizer: Tokenizer, records: Sequence[QARecord], seq_len: int, num_perturbed: int
) -> QASet:
    ids = np.array([r.id for r in records], np.int64)
    vocab = tokenizer.vocab_size

    def dataset(questions: list[str], answers: list[str], name: str) -> Dataset:
        x, y, weights = encode_qa(
            tokenizer, [format_prompt(q) for q in questions], answers, seq_len=seq_len
        )
        return Dataset(x, y, ids, name, vocab, weights)

    questions = [r.question for r in records]
    return QASet(
        qa=dataset(questions, [r.answer for r in records], "facts"),
        paraphrased_question=dataset(
            [r.paraphrased_question for r in records],
            [r.answer for r in records],
            "facts/paraphrased_question",
        ),
        paraphrased_answer=dataset(
            questions, [r.paraphrased_answer for r in records], "facts/paraphrased_answer"
        ),
        perturbed=tuple(
            dataset(questions, [r.perturbed_answers[k] for r in records], f"facts/perturbed{k}")
            for k in range(num_perturbed)
        ),
    )


def generate_facts(
    *,
    seed: int = 0,
    num_authors: int = 200,
    num_holdout_authors: int = 20,
    num_perturbed: int = 3,
    tokenizer: str = "words",
    seq_len: int | None = None,
) -> FactsData:
    """Generates the fictitious-facts benchmark.

    Everything is a function of the arguments. The generator's streams are independent
    (``numpy.random.SeedSequence(seed).spawn``): the world, the profiles, the perturbations and
    the split order each have their own, so e.g. ``num_perturbed`` does not change the profiles.

    Args:
      seed: an integer >= 0.
      num_authors: training authors (forget sets are chosen among them), >= 2.
      num_holdout_authors: further authors never trained on, >= 1.
      num_perturbed: perturbed answers per question, in ``[1, 7]`` (the smallest pool, the eight
        countries, allows seven wrong values).
      tokenizer: ``"words"`` (the corpus's words as tokens, bytes for the rest; about one token per
        word) or ``"bytes"`` (byte-level, vocabulary 259).
      seq_len: the length ``T`` of every encoded row; ``None`` picks the longest pair (over every
        variant and :data:`REFUSALS`) rounded up to a multiple of 8.

    Returns:
      A :class:`FactsData`. With the defaults: 1200 training-author pairs + 56 world facts
      (train 1256), 120 holdout pairs; the word tokenizer's vocabulary is 664 and
      ``seq_len`` 40.

    Raises:
      ValueError: for a bad argument (the message names it and the valid range).
    """
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed=}.")
    if not _is_int(num_authors) or num_authors < 2:
        raise ValueError(f"num_authors must be an integer >= 2, got {num_authors=}.")
    if not _is_int(num_holdout_authors) or num_holdout_authors < 1:
        raise ValueError(
            f"num_holdout_authors must be an integer >= 1, got {num_holdout_authors=}."
        )
    total = int(num_authors + num_holdout_authors)
    max_authors = min(
        len(FIRST_NAMES) * len(SURNAMES), len(TITLE_ADJECTIVES) * len(TITLE_NOUNS) // 2
    )
    if total > max_authors:
        raise ValueError(
            f"num_authors + num_holdout_authors = {total} exceeds the {max_authors} distinct "
            "profiles the word lists allow."
        )
    if not _is_int(num_perturbed) or not 1 <= num_perturbed <= len(COUNTRIES) - 1:
        raise ValueError(f"num_perturbed must be an integer in [1, 7], got {num_perturbed=}.")
    if tokenizer not in ("words", "bytes"):
        raise ValueError(f"tokenizer must be 'words' or 'bytes', got {tokenizer=}.")

    world_seq, profile_seq, perturb_seq, split_seq = np.random.SeedSequence(int(seed)).spawn(4)
    world = _world(np.random.default_rng(world_seq))
    profiles = _profiles(np.random.default_rng(profile_seq), total)
    perturb_rng = np.random.default_rng(perturb_seq)
    records = [r for p in profiles for r in _author_records(perturb_rng, p, num_perturbed)]
    records += _world_records(perturb_rng, world, num_perturbed)

    corpus = [
        text
        for r in records
        for text in (
            format_prompt(r.question),
            format_prompt(r.paraphrased_question),
            " " + r.answer,
            " " + r.paraphrased_answer,
            *(" " + a for a in r.perturbed_answers),
        )
    ] + [" " + refusal for refusal in REFUSALS]
    tok = Tokenizer.from_corpus(corpus) if tokenizer == "words" else Tokenizer()

    # Each text is encoded once: a pair's length is its prompt's plus its answer's.
    prompt_len = {}
    answer_len = {a: len(tok.encode(" " + a, eos=True)) for a in REFUSALS}
    longest = 0
    for r in records:
        for question in (r.question, r.paraphrased_question):
            if question not in prompt_len:
                prompt_len[question] = len(tok.encode(format_prompt(question), bos=True))
        for answer in (r.answer, r.paraphrased_answer, *r.perturbed_answers):
            answer_len[answer] = len(tok.encode(" " + answer, eos=True))
        longest = max(
            longest,
            max(prompt_len[r.question], prompt_len[r.paraphrased_question])
            + max(
                answer_len[a]
                for a in (r.answer, r.paraphrased_answer, *r.perturbed_answers, *REFUSALS)
            )
            - 1,
        )
    if seq_len is None:
        seq_len = 8 * math.ceil(longest / 8)
    elif not _is_int(seq_len) or seq_len < longest:
        raise ValueError(
            f"seq_len must be an integer >= {longest} (the longest pair), got {seq_len=}."
        )

    order = np.random.default_rng(split_seq).permutation(total)
    holdout_authors = np.sort(order[:num_holdout_authors]).astype(np.int64)
    forget_order = order[num_holdout_authors:].astype(np.int64)
    records.sort(key=lambda r: r.id)
    pairs = _encode_records(tok, records, int(seq_len), num_perturbed)
    info = {
        "source": "unlearn_jax.data.facts.generate_facts (fictitious authors and world facts)",
        "ids": f"{AUTHOR_ID_STRIDE} * author + question for authors, {WORLD_ID_OFFSET} + j for "
        "world facts",
        "seed": int(seed),
        "num_authors": int(num_authors),
        "num_holdout_authors": int(num_holdout_authors),
        "num_perturbed": int(num_perturbed),
        "seq_len": int(seq_len),
        "tokenizer": tok.to_info(),
        "prompt_template": PROMPT_TEMPLATE,
        "forget_order": forget_order.tolist(),
        "holdout_authors": holdout_authors.tolist(),
    }
    return FactsData(
        records=tuple(records),
        profiles=tuple(profiles),
        tokenizer=tok,
        pairs=pairs,
        train_authors=np.sort(forget_order),
        holdout_authors=holdout_authors,
        forget_order=forget_order,
        seed=int(seed),
        info=info,
    )


def _is_int(*values: Any) -> bool:
    return all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values)

"""Compositional caption negatives: captions with the same words (or nearly) that describe another scene.

    perturber = CaptionPerturber.for_dataset(info)     # word classes from a dataset.json, if it declares them
    perturber.sample("a red circle left of a blue square", positives, rng, k=2)
    # [Perturbation("a blue circle left of a red square", "swap_attribute"),
    #  Perturbation("a blue square left of a red circle", "swap_around_relation")]

A dual encoder that contrasts an image only against the other captions of its batch can get far by counting
words: the confuser that differs only in binding ("a blue circle left of a red square") or in order ("a blue
square left of a red circle") almost never shares its batch. These strategies (NegCLIP's and SugarCrepe's
families, written without a language model) make that confuser for every caption, on the fly:

Generic, for any caption (no declaration needed):
- `swap_around_relation`: the phrases on either side of a relation word trade places ("A left of B" -> "B left
  of A"); the relation words are the declared `relation` class, else a built-in list of spatial and
  possessive phrases (`GENERIC_RELATIONS`).
- `swap_words`: two content words (not in `STOPWORDS`) trade places.
- `shuffle`: the content words are shuffled among their positions (NegCLIP's shuffle).

Targeted, from word classes the data declares (dataset.json `"word_classes"`, or the data module's
`word_classes` option), each class a role and its interchangeable words or phrases:

    "word_classes": {
      "color":    {"role": "attribute", "words": ["red", "green", "blue", "yellow", "purple"]},
      "shape":    {"role": "object",    "words": ["circle", "square", "triangle", "diamond"]},
      "relation": {"role": "relation",  "words": ["left of", "to the right of", "above", "below"]}
    }

- `swap_attribute` / `swap_object`: two different words of one attribute (object) class in the caption trade
  places ("a red circle left of a blue square" -> "a blue circle left of a red square"): binding.
- `replace_attribute` / `replace_object`: one such word becomes another word of its class that the caption does
  not use ("a small red circle" -> "a small green circle").
- `replace_relation`: a relation phrase becomes another of its class ("left of" -> "above").

Every candidate is a real negative only if it does not describe the image: a perturbation is never the caption
itself, nor any other caption of the same image (`positives`), compared case- and space-insensitively. When the
captions of an image are all its paraphrases (shapes and the digit scenes list every one), that is exact; for
free-form captions it is the usual NegCLIP approximation.

Known-only negatives (`sample(..., known=...)`, the data module's `negatives_known_only`): a perturbation of a
training caption can be a composition the training data never shows (swapping the colours of "a yellow square
left of a blue circle" makes a "yellow circle"). As a negative it teaches that such a composition is never a
positive, which is exactly what a model must not learn when held-out compositions are to be recognised at test
time. With `known` (the normalized captions seen so far) only perturbations that are themselves captions of
other training samples are drawn: hard negatives that stay inside the training distribution.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmret.errors import UsageError

ROLES = ("attribute", "object", "relation")
GENERIC_TYPES = ("swap_around_relation", "swap_words", "shuffle")
TARGETED_TYPES = ("swap_attribute", "swap_object", "replace_attribute", "replace_object", "replace_relation")
PERTURBATION_TYPES = TARGETED_TYPES + GENERIC_TYPES
# Drawn first by `sample`: the confusers that keep every word and its role (binding, order, a word of the same
# class), which counting words cannot tell apart; then the bag-of-words ones.
STRUCTURED_TYPES = TARGETED_TYPES + ("swap_around_relation",)
# Relation phrases looked for when the data declares none (longest first when matching).
GENERIC_RELATIONS = (
    "to the left of",
    "to the right of",
    "left of",
    "right of",
    "on top of",
    "in front of",
    "next to",
    "behind",
    "beside",
    "above",
    "below",
    "under",
    "beneath",
    "near",
    "holding",
    "riding",
    "wearing",
    "on",
    "in",
    "with",
)
_STOPWORD_TEXT = (
    "a an the of and or to in on at by with from for is are was were be been this that these those it its "
    "their his her some one two three there here up down left right top bottom near next"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def normalize(caption: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: how captions are compared."""
    return " ".join(caption.lower().split()).strip(" .,;:!?")


def caption_key(caption: str) -> int:
    """A stable 63-bit key of a normalised caption (the same in every process), for false-negative masking."""
    digest = hashlib.blake2b(normalize(caption).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class Perturbation:
    """A negative caption and the strategy that made it (one of PERTURBATION_TYPES)."""

    text: str
    type: str


@dataclass(frozen=True)
class WordClass:
    name: str
    role: str
    words: tuple[str, ...]


def parse_word_classes(spec: Mapping | None, where: str = "word_classes") -> list[WordClass]:
    """Validate a `word_classes` mapping (see the module docstring) into WordClass entries."""
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        raise UsageError(
            f"{where}: expected a mapping of class name -> {{role, words}}, got {type(spec).__name__}"
        )
    classes = []
    for name, entry in spec.items():
        if not isinstance(entry, Mapping) or "words" not in entry:
            raise UsageError(f"{where}.{name}: expected {{'role': ..., 'words': [...]}}, got {entry!r}")
        role = entry.get("role", "attribute")
        if role not in ROLES:
            raise UsageError(f"{where}.{name}.role is {role!r}; expected one of {', '.join(ROLES)}")
        words = entry["words"]
        if (
            isinstance(words, str)
            or not all(isinstance(w, str) and w.strip() for w in words)
            or len(words) < 2
        ):
            raise UsageError(f"{where}.{name}.words: expected a list of at least two words or phrases")
        classes.append(WordClass(str(name), role, tuple(normalize(w) for w in words)))
    return classes


def _find_phrase(text: str, phrase: str) -> list[tuple[int, int]]:
    pattern = rf"(?<![A-Za-z0-9]){re.escape(phrase)}(?![A-Za-z0-9])"  # captions are whitespace-normalised
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def _occurrences(text: str, phrases: Iterable[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping matches (start, end, canonical phrase) of any of `phrases` in `text` (case-insensitive),
    longest phrase first, in text order."""
    taken: list[tuple[int, int, str]] = []
    for phrase in sorted(set(phrases), key=len, reverse=True):
        for start, end in _find_phrase(text, phrase):
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, phrase))
    return sorted(taken)


def _content_words(text: str) -> list[tuple[int, int, str]]:
    return [
        (m.start(), m.end(), m.group()) for m in _WORD.finditer(text) if m.group().lower() not in STOPWORDS
    ]


def _replace_spans(text: str, replacements: Sequence[tuple[int, int, str]]) -> str:
    out, position = [], 0
    for start, end, new in sorted(replacements):
        out += [text[position:start], new]
        position = end
    return "".join(out + [text[position:]])


class CaptionPerturber:
    """Makes compositional negatives of a caption (see the module docstring for the strategies).

    Args:
        word_classes: the data's word classes (dataset.json `word_classes`); None: generic strategies only.
        types: the strategies to use, a subset of PERTURBATION_TYPES; None: every one that applies.
    """

    def __init__(self, word_classes: Mapping | None = None, types: Sequence[str] | None = None):
        self.classes = parse_word_classes(word_classes)
        if types is not None:
            unknown = [t for t in types if t not in PERTURBATION_TYPES]
            if unknown or not types:
                raise UsageError(
                    f"perturbation types {list(types)}: expected a non-empty subset of {', '.join(PERTURBATION_TYPES)}"
                )
        self.types = tuple(types) if types is not None else PERTURBATION_TYPES
        declared = [w for c in self.classes if c.role == "relation" for w in c.words]
        self.relations = tuple(declared) if declared else GENERIC_RELATIONS

    @classmethod
    def for_dataset(
        cls, info: Mapping | None, word_classes: Mapping | None = None, types: Sequence[str] | None = None
    ) -> CaptionPerturber:
        """A perturber for data whose dataset.json is `info`; `word_classes` (if given) extends/overrides its own."""
        declared = dict((info or {}).get("word_classes") or {})
        declared.update(word_classes or {})
        return cls(declared or None, types)

    # ---- candidates of one strategy ---------------------------------------------------------------------
    def candidates(self, caption: str, kind: str) -> list[str]:
        """Every caption the strategy `kind` makes from `caption` (deterministic order, may hold the caption).

        The caption's own casing is kept (its words move; replacements are written as the class declares
        them), so a cased tokenizer cannot tell perturbations from captions by case alone."""
        text = " ".join(caption.split())
        if kind in ("swap_attribute", "swap_object"):
            role = kind.split("_")[1]
            out = []
            for word_class in (c for c in self.classes if c.role == role):
                found = _occurrences(text, word_class.words)
                for i in range(len(found)):
                    for j in range(i + 1, len(found)):
                        (s1, e1, w1), (s2, e2, w2) = found[i], found[j]
                        if w1 != w2:
                            out.append(_replace_spans(text, [(s1, e1, text[s2:e2]), (s2, e2, text[s1:e1])]))
            return out
        if kind in ("replace_attribute", "replace_object", "replace_relation"):
            role = kind.split("_")[1]
            out = []
            for word_class in (c for c in self.classes if c.role == role):
                found = _occurrences(text, word_class.words)
                used = {w for _, _, w in found}
                for start, end, _ in found:
                    out += [
                        _replace_spans(text, [(start, end, new)])
                        for new in word_class.words
                        if new not in used
                    ]
            return out
        if kind == "swap_around_relation":
            found = _occurrences(text, self.relations)
            if len(found) != 1:
                return []  # with several relation words the phrase boundaries are ambiguous
            start, end, _ = found[0]
            left, right = text[:start].strip(" ,"), text[end:].strip(" ,.")
            if not left or not right:
                return []
            return [f"{right} {text[start:end]} {left}"]
        if kind in ("swap_words", "shuffle"):
            spans = _content_words(text)
            if kind == "swap_words":
                return [
                    _replace_spans(
                        text,
                        [(spans[i][0], spans[i][1], spans[j][2]), (spans[j][0], spans[j][1], spans[i][2])],
                    )
                    for i in range(len(spans))
                    for j in range(i + 1, len(spans))
                    if spans[i][2].lower() != spans[j][2].lower()
                ]
            return []  # shuffles are drawn at random, see `_draw`
        raise UsageError(
            f"unknown perturbation type {kind!r}; expected one of {', '.join(PERTURBATION_TYPES)}"
        )

    def _draw(
        self, caption: str, kind: str, rng: np.random.Generator, known: Container[str] | None = None
    ) -> str | None:
        if kind != "shuffle":
            options = self.candidates(caption, kind)
            if known is not None:
                options = [option for option in options if normalize(option) in known]
            return options[int(rng.integers(len(options)))] if options else None
        text = " ".join(caption.split())
        spans = _content_words(text)
        if len({word.lower() for _, _, word in spans}) < 2:
            return None
        order = rng.permutation(len(spans))
        shuffled = _replace_spans(text, [(s, e, spans[int(o)][2]) for (s, e, _), o in zip(spans, order)])
        return shuffled if known is None or normalize(shuffled) in known else None

    # ---- what training and evaluation call ----------------------------------------------------------------
    def applicable_types(self, caption: str) -> list[str]:
        """The configured strategies that can change `caption`."""
        return [kind for kind in self.types if kind == "shuffle" or self.candidates(caption, kind)]

    def sample(
        self,
        caption: str,
        positives: Iterable[str],
        rng: np.random.Generator,
        k: int,
        known: Container[str] | None = None,
    ) -> list[Perturbation]:
        """Up to `k` distinct negatives of `caption`, each of a strategy drawn at random among those that apply.

        The structured strategies (`STRUCTURED_TYPES`: the targeted ones, when the data declares word classes,
        and `swap_around_relation`) are drawn before `swap_words` and `shuffle`: they make the confusers a
        bag-of-words model cannot tell apart. Never returns the caption or any of `positives`.
        With `known` (normalized captions, see `normalize`), only negatives in it are returned.
        """
        excluded = {normalize(p) for p in positives} | {normalize(caption)}
        targeted = [t for t in self.types if t in STRUCTURED_TYPES]
        generic = [t for t in self.types if t not in STRUCTURED_TYPES]
        out: list[Perturbation] = []
        for group in (targeted, generic):
            kinds = [group[int(i)] for i in rng.permutation(len(group))]
            for _attempt in range(2):  # a second round so k > len(kinds) can still be met
                for kind in kinds:
                    if len(out) == k:
                        return out
                    text = self._draw(caption, kind, rng, known)
                    if text is not None and normalize(text) not in excluded:
                        excluded.add(normalize(text))
                        out.append(Perturbation(text, kind))
        return out

    def one_per_type(self, caption: str, positives: Iterable[str], seed: int = 0) -> list[Perturbation]:
        """A negative of every applicable strategy (SugarCrepe's one pair per type), seeded by the caption."""
        excluded = {normalize(p) for p in positives} | {normalize(caption)}
        rng = np.random.default_rng([seed, caption_key(caption) % 2**32])
        out = []
        for kind in self.types:
            for _ in range(8):  # random strategies may first draw an excluded caption
                text = self._draw(caption, kind, rng)
                if text is None or normalize(text) not in excluded:
                    break
            if text is not None and normalize(text) not in excluded:
                out.append(Perturbation(text, kind))
        return out


def collate_perturbed(
    samples: Sequence[Mapping], tokenizer: Callable[[list[str]], Any], k: int
) -> dict[str, Any]:
    """The `perturbed_*` batch fields of samples that carry `perturbed` (a list of Perturbation):

    perturbed_text     [B * k, L]  tokens (rows of sample i at i*k ... i*k + k - 1; "" pads)
    perturbed_valid    [B, k] bool
    perturbed_key      [B, k] int64 caption keys (-1 pads)
    perturbed_caption  B lists of k strings;  perturbed_type: B lists of k type names ("" pads)
    """
    valid = torch.zeros(len(samples), k, dtype=torch.bool)
    keys = torch.full((len(samples), k), -1, dtype=torch.long)
    captions: list[list[str]] = []
    types: list[list[str]] = []
    for row, sample in enumerate(samples):
        chosen = list(sample["perturbed"])[:k]
        valid[row, : len(chosen)] = True
        keys[row, : len(chosen)] = torch.tensor([caption_key(p.text) for p in chosen], dtype=torch.long)
        captions.append([p.text for p in chosen] + [""] * (k - len(chosen)))
        types.append([p.type for p in chosen] + [""] * (k - len(chosen)))
    text = tokenizer([caption for row in captions for caption in row])
    if not isinstance(text, torch.Tensor):
        text = dict(text)
    return {
        "perturbed_text": text,
        "perturbed_valid": valid,
        "perturbed_key": keys,
        "perturbed_caption": captions,
        "perturbed_type": types,
    }


def caption_key_rows(caption_lists: Sequence[Sequence[str]]) -> torch.Tensor:
    """`[B, C]` int64 keys of each sample's captions (C = the most captions of one sample; -1 pads)."""
    width = max((len(captions) for captions in caption_lists), default=0)
    keys = torch.full((len(caption_lists), max(width, 1)), -1, dtype=torch.long)
    for row, captions in enumerate(caption_lists):
        for column, caption in enumerate(captions):
            keys[row, column] = caption_key(caption)
    return keys


def caption_keys_of(captions: Sequence[Sequence[str]]) -> torch.Tensor:
    """`[B, k]` int64 keys of B rows of k captions each ("" -> -1)."""
    return torch.tensor(
        [[caption_key(c) if c else -1 for c in row] for row in captions], dtype=torch.long
    ).reshape(len(captions), -1)

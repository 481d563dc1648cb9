"""TAGS-DC building blocks: spans, masking statistics, the filter, the generator's temperature, the heads and
their losses, and the one-word-swap builder. Statistical tests also reject a deliberately wrong setting."""

import pytest
import torch
from scipy import stats

from fne_fast.tags.filtering import CandidateFilter, normalise
from fne_fast.tags.heads import (DISCRIMINATION_WEIGHTS, TagsHeads, WordHead, discrimination_loss, sample_words,
                                 synthetic_ranking_loss, word_loss)
from fne_fast.tags.masking import MASK_TOKEN, mask_caption
from fne_fast.tags.spans import SPAN_KINDS, ParsedCaption, Span
from fne_fast.tags.swap import SwapSet, build_swaps, swap_accuracy
from fne_fast.tags.synonyms import Synonyms
from fne_fast.tags.vocab import UNKNOWN, build_vocabulary


def _caption(text_words, spans, lemmas=None):
    words = tuple(text_words)
    spaces = tuple(" " for _ in words[:-1]) + ("",)
    return ParsedCaption(words, spaces, tuple(lemmas or (word.lower() for word in words)),
                         tuple(Span(kind, tuple(positions)) for kind, positions in spans))


RED_CAR = _caption(["a", "red", "car", "on", "a", "bridge"],
                   [("attribute", [1]), ("object", [2]), ("relation", [3]), ("object", [5])])
TWO_MEN = _caption(["two", "men", "holding", "ice", "cream"],
                   [("attribute", [0]), ("object", [1]), ("relation", [2]), ("object", [3, 4])],
                   ["two", "man", "hold", "ice", "cream"])
BLUE_BIKE = _caption(["a", "blue", "bicycle", "under", "the", "tree"],
                     [("attribute", [1]), ("object", [2]), ("relation", [3]), ("object", [5])])
SYNONYMS = Synonyms({"car": frozenset({1}), "automobile": frozenset({1}), "auto": frozenset({1}),
                     "bicycle": frozenset({2}), "bike": frozenset({2})})


# --- spans ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nlp():
    pytest.importorskip("spacy", reason="spaCy is installed by scripts/setup_data.sh")
    from fne_fast.tags.spans import MissingSpacyError, load_spacy

    try:
        return load_spacy()
    except MissingSpacyError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("text, expected", [
    ("a red car on a bridge", [("attribute", ["red"]), ("object", ["car"]), ("relation", ["on"]),
                               ("object", ["bridge"])]),
    ("two men holding hands", [("attribute", ["two"]), ("object", ["men"]), ("relation", ["holding"]),
                               ("object", ["hands"])]),
    ("ice cream cone", [("object", ["ice", "cream", "cone"])]),
    ("thumbs up: medium skin tone", [("relation", ["thumbs"]), ("relation", ["up"]), ("attribute", ["medium"]),
                                     ("object", ["skin", "tone"])]),
    ("keycap: #", [("object", ["keycap"])]),
])
def test_spans_of_fixed_sentences(nlp, text, expected):
    from fne_fast.tags.spans import parse_captions

    parsed = parse_captions([text], nlp, progress=False)[0]
    assert parsed.text == text
    assert [(span.kind, [parsed.words[p] for p in span.positions]) for span in parsed.spans] == expected


def test_replaced_keeps_the_capital_and_the_spacing():
    caption = _caption(["Red", "car", ","], [("attribute", [0]), ("object", [1])])
    assert caption.replaced({0: "blue", 1: "bike"}) == "Blue bike ,"


# --- masking ----------------------------------------------------------------------------------------------------

def _masking_counts(caption, draws, probability, mask_share):
    vocabulary = build_vocabulary([caption, BLUE_BIKE])
    generator = torch.Generator().manual_seed(1)
    selected = torch.zeros(len(caption.spans))
    shown = {"mask": 0, "random": 0, "kept": 0}
    for _ in range(draws):
        version = mask_caption(caption, vocabulary, generator, probability=probability, mask_share=mask_share)
        assert version.positions, "every version masks at least one span"
        for index, span in enumerate(caption.spans):
            selected[index] += set(span.positions) <= set(version.positions)
        for position in version.positions:
            word = version.words[position]
            if word == MASK_TOKEN:
                shown["mask"] += 1
            elif word == caption.words[position]:
                shown["kept"] += 1  # a random draw of the word itself also lands here (counted in the oracle)
            else:
                assert vocabulary.id(word) != UNKNOWN
                shown["random"] += 1
        unselected = set(range(len(caption.words))) - set(version.positions)
        assert all(version.words[position] == caption.words[position] for position in unselected)
    return selected, shown, len(vocabulary)


def _masking_p_values(caption, draws, probability=0.15, mask_share=0.8):
    """p-values of the span selection rate and of the mask / random / kept shares against the documented
    scheme (0.15; 80/10/10 with at least one span)."""
    selected, shown, vocabulary_size = _masking_counts(caption, draws, probability, mask_share)
    spans = len(caption.spans)
    none = 0.85 ** spans
    rate = 0.15 + none / spans  # a span is also chosen as the forced one when no span was selected
    rate_p = stats.binomtest(int(selected.sum()), draws * spans, rate).pvalue
    random_itself = 0.1 / (vocabulary_size - 1)  # the random word happens to be the original
    expected = [0.8, 0.1 - random_itself, 0.1 + random_itself]
    observed = [shown["mask"], shown["random"], shown["kept"]]
    share_p = stats.chisquare(observed, [sum(observed) * share for share in expected]).pvalue
    return rate_p, share_p


def test_masking_rate_and_shares_follow_the_scheme():
    rate_p, share_p = _masking_p_values(RED_CAR, 4000)
    assert rate_p > 1e-3 and share_p > 1e-3


def test_masking_test_rejects_a_wrong_rate_and_a_wrong_mask_share():
    wrong_rate_p, _ = _masking_p_values(RED_CAR, 4000, probability=0.25)
    _, wrong_share_p = _masking_p_values(RED_CAR, 4000, mask_share=0.7)
    assert wrong_rate_p < 1e-6 and wrong_share_p < 1e-6


def test_masking_selects_whole_spans_and_refuses_a_caption_without_span():
    vocabulary = build_vocabulary([TWO_MEN])
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        version = mask_caption(TWO_MEN, vocabulary, generator)
        assert (3 in version.positions) == (4 in version.positions)  # "ice cream" goes as one span
        assert version.kinds == tuple(next(span.kind for span in TWO_MEN.spans if p in span.positions)
                                      for p in version.positions)
    with pytest.raises(ValueError, match="no span"):
        mask_caption(_caption(["the"], []), vocabulary, generator)


# --- filtering --------------------------------------------------------------------------------------------------

def _filter():
    captions = ["A red car on a bridge.", "car, red", "a blue bicycle under the tree"]
    return CandidateFilter(captions, [0, 0, 1], [7, 7], SYNONYMS)  # both images in group 7


def test_filter_drops_copies_of_group_captions_duplicates_and_synonym_swaps():
    checker, seen = _filter(), set()
    # A copy of the caption of the other image of the group, up to case and punctuation.
    assert checker.reason_to_drop(0, BLUE_BIKE, {}, "A Blue bicycle under the tree!", seen) == "copy"
    replacements = {2: ("bike", "bike")}
    assert checker.reason_to_drop(0, RED_CAR, {2: ("automobile", "automobile")}, "a red automobile on a bridge",
                                  seen) == "synonym"
    assert checker.reason_to_drop(0, RED_CAR, {2: ("cars", "car")}, "a red cars on a bridge", seen) == "synonym"
    assert checker.reason_to_drop(0, RED_CAR, replacements, "a red bike on a bridge", seen) is None
    assert checker.reason_to_drop(0, RED_CAR, replacements, "A red bike on a bridge", seen) == "duplicate"
    # One synonym and one real change: a negative.
    mixed = {2: ("auto", "auto"), 1: ("green", "green")}
    assert checker.reason_to_drop(0, RED_CAR, mixed, "a green auto on a bridge", seen) is None


def test_without_groups_only_the_images_own_captions_are_copies():
    checker = CandidateFilter(["a red car on a bridge", "a red bike on a bridge"], [0, 1], None, SYNONYMS)
    bike = {2: ("bike", "bike")}
    assert checker.reason_to_drop(0, RED_CAR, bike, "a red bike on a bridge", set()) is None
    assert checker.reason_to_drop(1, RED_CAR, bike, "a red bike on a bridge", set()) == "copy"


def test_candidates_made_of_group_words_are_copies_and_the_positive_check_is_broader():
    checker = _filter()
    assert checker.reason_to_drop(0, RED_CAR, {1: ("car", "car")}, "red, car", set()) == "copy"  # reordered
    assert checker.reason_to_drop(0, RED_CAR, {1: ("car", "car")}, "car, car", set()) == "copy"  # a repeat
    # A word of the other image of the group.
    assert checker.reason_to_drop(0, RED_CAR, {5: ("tree", "tree")}, "a red car on a tree", set()) == "copy"
    # A synonym of a group word in another place: kept by the filter, flagged by the (upper-bound) check.
    moved = {5: ("automobile", "automobile")}
    assert checker.reason_to_drop(0, RED_CAR, moved, "a red car on a automobile", set()) is None
    assert checker.is_positive(0, RED_CAR, moved, "a red car on a automobile")
    assert checker.is_positive(0, RED_CAR, {2: ("automobile", "automobile")}, "a red automobile on a bridge")
    assert checker.is_positive(0, RED_CAR, {2: ("bike", "bike")}, "a red bike on a bridge")  # bicycle's synonym
    assert not checker.is_positive(0, RED_CAR, {2: ("boat", "boat")}, "a red boat on a bridge")
    assert normalise("  A red-car!! ") == "a red car"


def test_wordnet_synonyms_from_the_debian_files():
    import os

    from fne_fast.data.wordnet import DEFAULT_ROOT
    from fne_fast.tags.synonyms import load_synonyms

    if not os.path.isdir(DEFAULT_ROOT):
        pytest.skip("wordnet-base is installed by scripts/setup_data.sh")
    synonyms = load_synonyms()
    assert synonyms.same_meaning("car", "car", "automobile", "automobile")
    assert synonyms.same_meaning("big", "big", "large", "large")
    assert not synonyms.same_meaning("car", "car", "bicycle", "bicycle")
    assert not synonyms.same_meaning("red", "red", "blue", "blue")


# --- the generator's sampling -----------------------------------------------------------------------------------

def _temperature_p_value(logits, drawn_at, tested_at, draws=60000):
    samples = sample_words(logits.expand(draws, -1), drawn_at, 1, torch.Generator().manual_seed(5)).flatten()
    assert (samples != UNKNOWN).all()
    expected = torch.softmax(logits[0, 1:].double() / tested_at, dim=0) * draws
    observed = torch.bincount(samples, minlength=logits.shape[1])[1:].double()
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


def test_refills_are_drawn_at_the_temperature():
    logits = torch.tensor([[5.0, 2.0, 1.0, 0.0, -1.0, 0.5]])  # word 0 is the unknown word: never drawn
    assert _temperature_p_value(logits, 1.5, 1.5) > 1e-3
    assert _temperature_p_value(logits, 1.0, 1.5) < 1e-6  # the same test rejects a wrong temperature
    with pytest.raises(ValueError, match="temperature"):
        sample_words(logits, 0.0, 1, torch.Generator())


# --- heads and losses -------------------------------------------------------------------------------------------

def test_heads_shapes():
    heads = TagsHeads(word_dim=12, image_dim=8, vocabulary_size=30, hidden_dim=16)
    words, image = torch.randn(5, 12), torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    assert heads.generator(words, image).shape == (5, 30)
    assert heads.corrector(words, image).shape == (5, 30)
    assert heads.discriminator(words, image).shape == (5, 2)
    head = WordHead(12, 8, 16, 3)
    assert head(words, image).shape == (5, 3)
    assert not torch.equal(head(words, image), head(words, -image))  # the image conditions the output


def test_synthetic_ranking_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    caption = torch.tensor([[0.8, 0.6], [0.0, 1.0]])  # s+ = 0.8 and 1.0
    synthetic = torch.tensor([[[0.7, 0.7], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])  # s- = 0.7, 0; 0, 1.0
    valid = torch.tensor([[True, True], [True, False]])
    loss, correct = synthetic_ranking_loss(image, caption, synthetic, valid, margin=0.2)
    # Hinges: 0.2 + 0.7 - 0.8 = 0.1, 0.2 + 0 - 0.8 -> 0, 0.2 + 0 - 1.0 -> 0; the invalid pair is left out.
    assert loss.item() == pytest.approx(0.1 / 3)
    assert correct.tolist() == [[True, True], [True, False]]


def test_discrimination_loss_weights_changed_words_by_one_and_others_by_011():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    changed = torch.tensor([True, False, True])
    log_p = torch.log_softmax(logits, dim=1)
    by_hand = -(DISCRIMINATION_WEIGHTS[1] * log_p[0, 1] + DISCRIMINATION_WEIGHTS[0] * log_p[1, 0]
                + DISCRIMINATION_WEIGHTS[1] * log_p[2, 1]) / 3
    assert discrimination_loss(logits, changed).item() == pytest.approx(by_hand.item())
    assert DISCRIMINATION_WEIGHTS == (0.11, 1.0)


def test_word_loss_leaves_out_unknown_targets():
    logits = torch.randn(3, 7)
    targets = torch.tensor([2, UNKNOWN, 5])
    by_hand = torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    assert word_loss(logits, targets).item() == pytest.approx(by_hand.item())
    assert word_loss(logits, torch.full((3,), UNKNOWN)).item() == 0.0


# --- the one-word-swap test -------------------------------------------------------------------------------------

def _swap_inputs():
    train = [RED_CAR, TWO_MEN, BLUE_BIKE, _caption(["a", "green", "bike", "near", "the", "house"],
                                                   [("attribute", [1]), ("object", [2]), ("relation", [3]),
                                                    ("object", [5])])]
    test = [RED_CAR, TWO_MEN]
    return build_vocabulary(train), test, [caption.text for caption in test], [0, 1], None


def test_swaps_change_one_word_of_each_kind_into_a_word_of_that_kind():
    vocabulary, parsed, captions, caption_image, groups = _swap_inputs()
    rows, kinds, texts = build_swaps(parsed, captions, caption_image, groups, vocabulary, SYNONYMS)
    assert sorted(zip(rows, kinds)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for row, kind, text in zip(rows, kinds, texts):
        original = parsed[row]
        new_words = text.split(" ")
        differing = [p for p, (a, b) in enumerate(zip(original.words, new_words)) if a != b]
        assert len(new_words) == len(original.words) and len(differing) == 1
        position = differing[0]
        span = next(span for span in original.spans if position in span.positions)
        assert SPAN_KINDS[kind] == span.kind and position == span.positions[-1]
        assert vocabulary.kind_counts[span.kind][vocabulary.id(new_words[position])] > 0
        assert not SYNONYMS.same_meaning(original.words[position], original.lemmas[position], new_words[position],
                                         new_words[position])
        assert normalise(text) not in {normalise(caption) for caption in captions}
    again = build_swaps(parsed, captions, caption_image, groups, vocabulary, SYNONYMS)
    other_seed = build_swaps(parsed, captions, caption_image, groups, vocabulary, SYNONYMS, seed=1)
    assert again == (rows, kinds, texts) and other_seed != again


def test_swap_accuracy_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # captions 0, 1 of images 0, 1; caption 2 of image 0
    swapped = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.9, 0.1]])
    swap_set = SwapSet(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 0]), ["", "", ""], swapped)
    result = swap_accuracy(image, text, swapped, swap_set, torch.tensor([0, 1, 0]))
    # Caption 0 wins (1 > 0), caption 1 ties (1 = 1: a miss), caption 2 loses (0.6 < 0.9).
    assert result == {"swap_acc": pytest.approx(100 / 3), "swap_acc_object": 50.0, "swap_acc_attribute": None,
                      "swap_acc_relation": 0.0}


def test_the_hardest_candidates_of_each_caption_are_kept():
    from fne_fast.tags.trainer import _hardest

    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2])  # caption 0: three candidates, caption 1: none, caption 2: two
    chosen, valid = _hardest(scores, torch.tensor([3, 0, 2]), keep=2)
    assert valid.tolist() == [[True, True], [False, False], [True, True]]
    assert chosen[0].tolist() == [1, 2] and chosen[2].tolist() == [3, 4]
    chosen, valid = _hardest(scores, torch.tensor([3, 0, 2]), keep=5)  # fewer candidates than keep
    assert valid.tolist() == [[True, True, True], [False] * 3, [True, True, False]]

"""What measures TAGS-DC honestly and what makes it share with the matcher: the held-out swap families, the caption
prior, the paired test of swap accuracies, the ablation's random refills, the tied word heads and the generator's
pretraining. Each oracle is also shown to reject a deliberately wrong result."""

import math
import os

import pytest
import torch
from scipy import stats

from fne_fast.experiments.paired import BEYOND_NOISE, WITHIN_NOISE, paired_accuracy
from fne_fast.models.heads import ProjectionHead
from fne_fast.tags.heads import TagsHeads, word_loss
from fne_fast.tags.heldout_swaps import build_exchange_swaps, build_unseen_swaps
from fne_fast.tags.lexicon import Lexicon, inflect_like, load_lexicon
from fne_fast.tags.pool import random_refills
from fne_fast.tags.prescore import agreement, estimated_embeddings
from fne_fast.tags.pretrain import MaskedWords, pretrain_generator, top1_accuracy
from fne_fast.tags.prior import BigramPrior
from fne_fast.tags.spans import SPAN_KINDS, ParsedCaption, Span
from fne_fast.tags.synonyms import Synonyms
from fne_fast.tags.vocab import UNKNOWN, Vocabulary, build_vocabulary


def _caption(words, spans):
    words = tuple(words)
    spaces = tuple(" " for _ in words[:-1]) + ("",)
    return ParsedCaption(words, spaces, tuple(word.lower() for word in words),
                         tuple(Span(kind, tuple(positions)) for kind, positions in spans))


RED_CAR = _caption(["a", "red", "car", "near", "a", "blue", "bike"],
                   [("attribute", [1]), ("object", [2]), ("relation", [3]), ("attribute", [5]), ("object", [6])])
LIST = _caption(["car", ",", "bike"], [("object", [0]), ("object", [2])])
NO_SYNONYMS = Synonyms({})


def _lexicons():
    """Nouns: car and bike under vehicle with van and tram; adjectives: red's cluster holds crimson."""
    nouns = Lexicon("noun", {"car": [1], "bike": [2], "van": [3], "tram": [4], "vehicle": [9]},
                    {1: ["car"], 2: ["bike"], 3: ["van"], 4: ["tram"], 9: ["vehicle"]},
                    {1: [("@", 9)], 2: [("@", 9)], 3: [("@", 9)], 4: [("@", 9)],
                     9: [("~", 1), ("~", 2), ("~", 3), ("~", 4)]}, {"van": 3, "tram": 1})
    adjectives = Lexicon("adj", {"red": [1], "blue": [2], "crimson": [3]}, {1: ["red"], 2: ["blue"], 3: ["crimson"]},
                         {1: [("&", 3)], 3: [("&", 1)]}, {"crimson": 2, "teal": 1})
    verbs = Lexicon("verb", {}, {}, {}, {})
    return {"noun": nouns, "adj": adjectives, "verb": verbs}


def test_unseen_swaps_use_siblings_outside_the_training_words():
    vocabulary = build_vocabulary([RED_CAR, _caption(["a", "van"], [("object", [1])])])
    rows, kinds, texts = build_unseen_swaps([RED_CAR], [RED_CAR.text], [0], None, vocabulary, NO_SYNONYMS,
                                            _lexicons(), seed=0)
    assert sorted(SPAN_KINDS[kind] for kind in kinds) == ["attribute", "object"]  # "near" is no WordNet verb
    for kind, text in zip(kinds, texts):
        changed = [(old, new) for old, new in zip(RED_CAR.words, text.split(" ")) if old != new]
        assert len(changed) == 1
        new = changed[0][1]
        assert vocabulary.id(new) == UNKNOWN  # the generator can never write it
        # van is a sibling of car but a training word; tram is the only unseen sibling; crimson red's.
        assert new == {"object": "tram", "attribute": "crimson"}[SPAN_KINDS[kind]]


def test_inflection_follows_the_original_form():
    assert inflect_like("running", "run", "dart") == "darting"
    assert inflect_like("holding", "hold", "bake") == "baking"
    assert inflect_like("jumped", "jump", "carry") == "carried"
    assert inflect_like("cars", "car", "bus") == "buses"
    assert inflect_like("red", "red", "blue") == "blue"


def test_exchanges_stay_within_a_clause_and_are_never_a_group_caption():
    captions = [RED_CAR.text, LIST.text]
    rows, kinds, texts = build_exchange_swaps([RED_CAR, LIST], captions, [0, 1], None, seed=0)
    assert rows == [0, 0]  # the keyword list's items are parted by a comma
    assert {text for text in texts} == {"a blue car near a red bike", "a red bike near a blue car"}
    # The attribute exchange is dropped when the image has that caption too; the object exchange stays.
    _, _, texts = build_exchange_swaps([RED_CAR, RED_CAR], [RED_CAR.text, "a blue car near a red bike"], [0, 0],
                                       None, seed=0)
    assert texts == ["a red bike near a blue car"] * 2


def test_bigram_prior_by_hand():
    prior = BigramPrior(["a red car", "a red bike"], weight=0.5)
    # Tokens: <s> a red car </s> twice over (car / bike): 8 counted tokens, 5 types, so unseen mass 8 + 5 + 1 = 14.
    unigram = {"a": 3 / 14, "red": 3 / 14, "car": 2 / 14, "</s>": 3 / 14}
    expected = (math.log(0.5 * 1 + 0.5 * unigram["a"]) + math.log(0.5 * 1 + 0.5 * unigram["red"])
                + math.log(0.5 * 0.5 + 0.5 * unigram["car"]) + math.log(0.5 * 1 + 0.5 * unigram["</s>"]))
    assert prior.log_probability("a red car") == pytest.approx(expected, rel=1e-12)
    assert prior.prefers_true(["a red car", "a red car"], ["car red a", "a red car"]).tolist() == [True, False]


def test_paired_accuracy_finds_a_consistent_gain_and_not_a_null_one():
    generator = torch.Generator().manual_seed(0)
    base = [torch.rand(400, generator=generator) < 0.6 for _ in range(3)]
    better = [won | (torch.rand(400, generator=generator) < 0.3) for won in base]
    result = paired_accuracy(better, base, "swap_acc", replicates=500)
    assert result["per_seed"] == pytest.approx([100.0 * (a.double() - b.double()).mean().item()
                                                for a, b in zip(better, base)])
    assert result["verdict"] == BEYOND_NOISE and result["bootstrap_interval"][0] > 0
    assert paired_accuracy(base, base, "swap_acc", replicates=200)["verdict"] == WITHIN_NOISE
    with pytest.raises(ValueError, match="same, non-empty trials"):
        paired_accuracy(base, [won[:10] for won in base], "swap_acc")


def test_random_refills_follow_the_kind_counts():
    vocabulary = build_vocabulary([RED_CAR, _caption(["a", "red", "van"], [("attribute", [1]), ("object", [2])])])
    draws = random_refills(vocabulary, ["attribute"] * 3000, 1, torch.Generator().manual_seed(0)).flatten()
    expected = vocabulary.kind_counts["attribute"] / vocabulary.kind_counts["attribute"].sum()
    support = expected > 0
    observed = torch.bincount(draws, minlength=len(vocabulary)).double()
    assert observed[~support].sum() == 0  # only words that fill attribute spans, never the unknown word
    assert stats.chisquare(observed[support], 3000 * expected[support]).pvalue > 1e-3
    wrong = vocabulary.kind_counts["object"] / vocabulary.kind_counts["object"].sum()
    assert observed[wrong == 0].sum() > 0  # the object counts would not have drawn these words


def _heads_and_text_head(tied: bool):
    torch.manual_seed(0)
    text_head = ProjectionHead(12, 8, 16)
    heads = TagsHeads(word_dim=12, image_dim=8, vocabulary_size=6, hidden_dim=16, tied_dim=8 if tied else None)
    return heads, text_head


def test_tied_heads_train_the_matchers_text_head_and_untied_ones_do_not():
    words = torch.randn(6, 12)
    for tied in (True, False):
        heads, text_head = _heads_and_text_head(tied)
        table = text_head(words) if tied else None
        logits = heads.word_logits(heads.generator, torch.randn(5, 12), torch.randn(5, 8), table)
        assert logits.shape == (5, 6)
        word_loss(logits, torch.tensor([1, 2, 3, 4, 5])).backward()
        reached = [parameter.grad is not None and parameter.grad.abs().sum() > 0
                   for parameter in text_head.parameters()]
        assert all(reached) if tied else not any(reached)
    heads, _ = _heads_and_text_head(True)
    with pytest.raises(ValueError, match="word_table"):
        heads.word_logits(heads.generator, torch.randn(1, 12), torch.randn(1, 8), None)


def test_pretraining_learns_the_masked_words_and_not_shuffled_ones():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 12, generator=generator) * 3
    targets = torch.randint(1, 6, (600,), generator=generator)
    states = centres[targets] + torch.randn(600, 12, generator=generator)
    image = torch.zeros(600, 8)
    for shuffled in (False, True):
        torch.manual_seed(0)
        heads = TagsHeads(word_dim=12, image_dim=8, vocabulary_size=6, hidden_dim=16)
        labels = targets[torch.randperm(600, generator=generator)] if shuffled else targets
        words = MaskedWords(states, labels, torch.zeros(600, dtype=torch.int64))
        logits_of = lambda s, i: heads.word_logits(heads.generator, s, i, None)  # noqa: E731
        before = top1_accuracy(logits_of, words, image)
        pretrain_generator(logits_of, heads.generator.parameters(), words, image, epochs=20, lr=1e-2,
                           random=torch.Generator().manual_seed(1), batch_size=64)
        after = top1_accuracy(logits_of, MaskedWords(states, targets, words.rows), image)
        # No gradient is left behind for the first training step to add to its own.
        assert all(parameter.grad is None for parameter in heads.generator.parameters())
        if shuffled:
            assert after < 50.0
        else:
            assert before < 50.0 < 90.0 < after


@pytest.mark.skipif(not os.path.isfile("/usr/share/wordnet/data.noun"), reason="Debian's wordnet-base")
def test_wordnet_siblings_from_the_debian_files():
    assert "wolf" in load_lexicon("noun").siblings("dog")
    assert "small" in load_lexicon("adj").siblings("big")
    assert "dog" not in load_lexicon("noun").siblings("dog")


def test_the_prescore_moves_the_caption_by_the_changed_words_own_embeddings():
    vocabulary = Vocabulary(["<unk>", "red", "blue", "car"], ["<unk>", "red", "blue", "car"], {})
    words = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    captions = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    changes = [((0, "red", "blue"),), ((0, "red", "blue"), (2, "car", "Red")), ((1, "red", "bicycle"),)]
    lengths = torch.tensor([4, 5, 3])
    estimate = estimated_embeddings(captions, changes, lengths, words, vocabulary)
    expected = torch.stack([captions[0] + (words[2] - words[1]) / 4,
                            captions[1] + (words[2] - words[1] + words[1] - words[3]) / 5,
                            captions[2]])  # a word outside the vocabulary moves nothing
    assert torch.allclose(estimate, torch.nn.functional.normalize(expected, dim=1), atol=1e-6)


def test_prescore_agreement_against_scipy_and_by_hand():
    random = torch.Generator().manual_seed(2)
    owner = torch.tensor([0] * 6 + [1] * 5 + [2] * 2)
    scores = torch.randn(13, generator=random, dtype=torch.float64)
    prescores = scores + torch.randn(13, generator=random, dtype=torch.float64)
    measured = agreement(prescores, scores, owner, keep=3)
    expected = (stats.spearmanr(prescores[:6], scores[:6]).statistic
                + stats.spearmanr(prescores[6:11], scores[6:11]).statistic) / 2  # caption 2 has too few
    assert measured["tags_prescore_spearman"] == pytest.approx(expected, abs=1e-12)
    found = sum(len(set(scores[rows].topk(3).indices.tolist()) & set(prescores[rows].topk(3).indices.tolist()))
                for rows in (slice(0, 6), slice(6, 11)))
    assert measured["tags_prescore_recall"] == pytest.approx(100 * found / 6)
    assert agreement(scores, scores, owner, keep=3) == {"tags_prescore_spearman": pytest.approx(1.0),
                                                        "tags_prescore_recall": 100.0}
    reversed_order = agreement(-scores, scores, owner, keep=3)
    assert reversed_order["tags_prescore_spearman"] == pytest.approx(-1.0)
    assert reversed_order["tags_prescore_recall"] == pytest.approx(100 * 1 / 6)  # 5 candidates: one in both tops

"""The v2 probe models' two stages: contrastive tower pretraining on probe world v2's captions (CLIP's objective),
resumable, touching only the tower; then question answering that starts from the pretrained tower."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from mmtoken.zoo import card, world
from mmtoken.zoo.pretrain import CAPTION_ENCODER, CaptionEncoder, PretrainConfig, contrastive_loss, pretrain, retrieval
from mmtoken.zoo.recipes import RECIPES
from mmtoken.zoo.train import TrainConfig, token_similarity, train

TINY = {"steps": 2, "batch_size": 3, "eval_every": 2, "warmup": 1}


def weights(folder) -> dict[str, torch.Tensor]:
    return {key: value for file in sorted(folder.glob("*.safetensors")) for key, value in load_file(file).items()}


def test_contrastive_loss_and_retrieval_reward_matching_pairs():
    embeddings = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    matched = 10 * embeddings @ embeddings.T
    shuffled = 10 * embeddings @ embeddings.roll(1, 0).T
    assert contrastive_loss(matched) < contrastive_loss(shuffled)
    assert retrieval(matched) == 1.0 and retrieval(shuffled) == 0.0


def test_captions_tokenize_within_the_vocabulary_and_end_with_the_end_token():
    _, processor = RECIPES["probe-llava-v2"]()
    encoder = CaptionEncoder(processor.tokenizer, image_width=128)
    captions = world.render_batch("image", 18, torch.Generator().manual_seed(2)).captions
    ids, end = encoder.tokens(captions, torch.device("cpu"))
    tokenizer = processor.tokenizer
    assert tokenizer.unk_token_id not in ids.tolist()
    assert (ids[torch.arange(18), end] == tokenizer.eos_token_id).all()
    assert [tokenizer.decode(row[:e].tolist()) for row, e in zip(ids, end, strict=True)] == captions
    assert encoder.embed_captions(captions, torch.device("cpu")).norm(dim=-1).allclose(torch.ones(18))


@pytest.mark.parametrize("name", ["probe-llava-v2", "probe-qwen2vl-v2"])
def test_pretraining_trains_only_the_tower_checkpoints_and_resumes(tmp_path, name):
    state = pretrain(name, tmp_path, PretrainConfig(**TINY, eval_batch=3))
    assert state["stage"] == "pretrain" and state["step"] == 2 and len(state["evaluations"]) == 1
    assert 0 <= state["evaluations"][0]["retrieval"] <= 1
    assert all(f.stat().st_size < 16_000_000 for f in (*tmp_path.glob("*.safetensors"), tmp_path / CAPTION_ENCODER))
    first, head = weights(tmp_path), torch.load(tmp_path / CAPTION_ENCODER)
    resumed = pretrain(name, tmp_path, PretrainConfig(**{**TINY, "steps": 3}, eval_batch=3), resume=tmp_path)
    assert resumed["step"] == 3 and resumed["samples"] == 9
    assert [(run["from_step"], run["resumed"]) for run in resumed["runs"]] == [(0, False), (2, True)]
    after = weights(tmp_path)
    language = [key for key in first if "language_model" in key or "lm_head" in key]
    tower = [key for key in first if key not in language]
    assert language and all(torch.equal(first[key], after[key]) for key in language)
    assert any(not torch.equal(first[key], after[key]) for key in tower)
    moved = (torch.load(tmp_path / CAPTION_ENCODER)["text_projection.weight"] - head["text_projection.weight"]).abs()
    assert 0 < moved.max() < 0.05, "the resumed run kept training the saved caption encoder"


def test_question_answering_starts_from_the_pretrained_tower(tmp_path):
    tower_dir, qa_dir = tmp_path / "tower", tmp_path / "qa"
    pretrain("probe-llava-v2", tower_dir, PretrainConfig(**TINY, eval_batch=3))
    pretrained = weights(tower_dir)
    config = TrainConfig(steps=1, batch_size=len(world.IMAGE_TASKS), eval_every=1, eval_per_task=1, warmup=1, lr=0.0)
    state = train("probe-llava-v2", qa_dir, config, pretrained=tower_dir)
    assert state["pretrained"]["step"] == 2 and state["step"] == 1
    assert -1.0 <= state["pretrained"]["token_similarity"] <= 1.0  # recorded once, as the run starts
    assert set(state["evaluations"][-1]["accuracy"]) == set(world.IMAGE_TASKS)
    assert not (qa_dir / "patch_head.pt").exists()  # v2 has no patch-colour loss
    trained = weights(qa_dir)
    assert all(torch.equal(pretrained[key], trained[key]) for key in pretrained)  # lr 0: the very same weights
    learnt = tmp_path / "learnt"
    for steps, start in ((2, {"pretrained": tower_dir}), (4, {"resume": learnt})):  # resumed, frozen too
        state = train("probe-llava-v2", learnt, TrainConfig(**{**asdict(config), "lr": 1e-2, "steps": steps}), **start)
        assert state["step"] == steps
        after = weights(learnt)
        encoder = [key for key in pretrained if "vision_tower" in key]
        moved = [key for key in pretrained if key not in encoder and not torch.equal(pretrained[key], after[key])]
        assert encoder and all(torch.equal(pretrained[key], after[key]) for key in encoder)
        assert any("multi_modal_projector" in key for key in moved) and any("language_model" in key for key in moved)
    with pytest.raises(ValueError, match="not a tower pretraining checkpoint of probe-llava-v2"):
        train("probe-llava-v2", tmp_path / "again", config, pretrained=qa_dir)
    with pytest.raises(ValueError, match="not both"):
        train("probe-llava-v2", tmp_path / "again", config, resume=qa_dir, pretrained=tower_dir)
    with pytest.raises(ValueError, match="needs a probe world v2 recipe; 'probe-llava' is not one"):
        pretrain("probe-llava", tmp_path / "v1", PretrainConfig(**TINY))
    cli = [sys.executable, "-m", "mmtoken", "zoo", "train", "probe-qwen2vl-v2", "--out", str(tmp_path / "x"),
           "--pretrained", str(tower_dir)]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 2 and "not a tower pretraining checkpoint of probe-qwen2vl-v2" in refused.stderr
    assert json.loads((tower_dir / "state.json").read_text())["step"] == 2
    text = card.write_card("probe-llava-v2", per_task=1, folder=qa_dir)
    assert "- Data: `mmtoken.zoo.world`, version" in text and "- Tower pretraining: 2 steps (6 images)" in text
    assert "`mmtoken zoo pretrain probe-llava-v2 --out TOWER --steps 2 --batch-size 3`" in text
    assert "the pretrained vision encoder frozen" in text
    assert "`mmtoken zoo train probe-llava-v2 --out DIR --steps 1 --batch-size 9 --pretrained TOWER`" in text
    assert "auxiliary per-patch colour loss" not in text
    header = "| setting | " + " | ".join(world.IMAGE_TASKS) + " |"
    assert header in text and "| image blanked |" in text and "| uniform @64 |" in text and "material 1/3" in text
    assert (qa_dir / "MODEL_CARD.md").read_text() == text and (qa_dir / "training_curve.png").stat().st_size > 10_000


def test_token_similarity_is_the_mean_cosine_between_two_different_tokens_of_an_image():
    alike = torch.ones(2, 5, 3)
    apart = torch.eye(4)[None]  # four orthogonal tokens
    half = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # pairs: 1, 0, 0 (each counted both ways)
    assert token_similarity(alike) == pytest.approx(1.0)
    assert token_similarity(apart) == pytest.approx(0.0)
    assert token_similarity(half) == pytest.approx(1 / 3)

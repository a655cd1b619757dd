"""Checkpoint round trip, identity, and refusal of corrupt or foreign files."""
import pickle

import pytest
import torch

from ama_stream.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ama_stream.model import AMA, ModelConfig
from ama_stream.preprocess import PreprocessSpec
from ama_stream.scoring import Scorer


def make_checkpoint(seed: int = 0, **model_kw) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(image_size=32, channels=1, nz=16, enc_width=8, gen_width=16, disc_width=16), **model_kw})
    model = AMA(cfg)
    return Checkpoint(
        model=cfg,
        preprocess=PreprocessSpec(image_size=cfg.image_size, channels=cfg.channels),
        state_dict=model.state_dict(),
        mu=5.0,
        sigma=2.0,
        n_train=100,
        train_config={"seed": seed},
        metrics={"auroc_a": 0.5},
    )


def test_round_trip_restores_weights_and_metadata(tmp_path):
    ckpt = make_checkpoint()
    model_id = save_checkpoint(ckpt, tmp_path / "m" / "model.pt")
    loaded = load_checkpoint(tmp_path / "m" / "model.pt")
    assert loaded.model == ckpt.model and loaded.preprocess == ckpt.preprocess
    assert (loaded.mu, loaded.sigma, loaded.n_train) == (5.0, 2.0, 100)
    assert loaded.train_config == {"seed": 0} and loaded.metrics == {"auroc_a": 0.5}
    assert loaded.model_id == model_id and len(model_id) == 16
    for k, v in ckpt.state_dict.items():
        assert torch.equal(loaded.state_dict[k], v)
    assert not list((tmp_path / "m").glob("*.tmp"))  # atomic write leaves no temp file


def test_model_id_follows_the_weights_not_the_metadata(tmp_path):
    a, b = make_checkpoint(seed=0), make_checkpoint(seed=0)
    b.metrics = {"auroc_a": 0.9}
    c = make_checkpoint(seed=1)
    ids = [save_checkpoint(x, tmp_path / f"{i}.pt") for i, x in enumerate((a, b, c))]
    assert ids[0] == ids[1] != ids[2]


def test_scorer_gives_identical_scores_after_reload(tmp_path):
    ckpt = make_checkpoint()
    save_checkpoint(ckpt, tmp_path / "model.pt")
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    direct = Scorer(ckpt, device="cpu").score_tensor(x)
    reloaded = Scorer(str(tmp_path / "model.pt"), device="cpu").score_tensor(x)
    assert (direct.r == reloaded.r).all()


def test_cuda_saved_tensors_load_on_cpu(tmp_path, monkeypatch):
    """Storages tagged 'cuda:0' (as a GPU machine writes them) load on a CPU-only machine."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(make_checkpoint().to_payload(), tmp_path / "cuda.pt")
    if not torch.cuda.is_available():  # the file really needs remapping here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "cuda.pt", weights_only=True)
    loaded = load_checkpoint(tmp_path / "cuda.pt")
    assert all(v.device.type == "cpu" for v in loaded.state_dict.values())


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "corrupt or truncated"),
        (b"not a checkpoint at all", "corrupt or truncated|not a safe"),
    ],
)
def test_garbage_files_are_refused(tmp_path, content, match):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)


def test_truncated_checkpoint_is_refused(tmp_path):
    save_checkpoint(make_checkpoint(), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_never_executed(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"format": "ama-stream/checkpoint", "payload": Evil()}, p)
    with pytest.raises(CheckpointError, match="not a safe"):
        load_checkpoint(p)
    assert "never run" not in capsys.readouterr().out
    p2 = tmp_path / "plain.pkl"
    p2.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(p2)
    assert "never run" not in capsys.readouterr().out


def test_foreign_and_invalid_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an ama-stream checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    payload = make_checkpoint().to_payload()
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
    payload = make_checkpoint().to_payload()
    payload["rscore"]["sigma"] = 0.0
    torch.save(payload, tmp_path / "sigma.pt")
    with pytest.raises(CheckpointError, match="sigma"):
        load_checkpoint(tmp_path / "sigma.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    payload = make_checkpoint().to_payload()
    payload["model"]["disc_width"] = 32
    torch.save(payload, tmp_path / "mismatch.pt")
    ckpt = load_checkpoint(tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        ckpt.build_model()

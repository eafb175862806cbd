"""Learned codebooks that do not collapse: restarts of unused codes (and initialisation from data), cosine lookup,
SimVQ's identity start and cached codebook, no weight decay on codebooks, the same codebook on every process, and the
codebook use the training log and `codebook_use_on_crops` report."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import save_model, tiny_model
from vqrae.quantizers import VQRAEVectorQuantizer
from vqrae.training.metrics import codebook_use_on_crops
from vqrae.training.state import _optimizer_groups


def _rows_in(rows: torch.Tensor, candidates: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
    """For each row of `rows`, whether it equals some row of `candidates`."""
    return (torch.cdist(rows.double(), candidates.double()).min(dim=1).values < atol).all()


@pytest.mark.parametrize("use_simvq", [False, True])
def test_the_first_training_batch_initialises_every_code_from_the_latents(use_simvq):
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(64, dim=12, codebook_dim=4, use_simvq=use_simvq, restart_unused_steps=3)
    assert (vq.steps_unused == 3).all()  # a new codebook counts every code unused
    z = torch.randn(40, 12)
    vq.train()(z)
    latents = vq.project_in(z).detach()
    assert _rows_in(vq.codebook.detach(), latents, atol=1e-4)
    if use_simvq:  # the frozen rows were solved for, the learned map is untouched
        assert torch.equal(vq.codebook_transform.weight, torch.eye(4))


def test_an_unused_code_is_restarted_after_the_set_number_of_passes_and_only_in_training():
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(8, dim=2, restart_unused_steps=2).train()
    cluster = torch.tensor([[5.0, 5.0]]) + 0.01 * torch.randn(16, 2)
    vq.steps_unused.zero_()  # a trained codebook: no code is due yet
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.arange(16.0).view(8, 2) * 10)
        vq.embedding.weight[3] = torch.tensor([5.0, 5.0])
    before = vq.embedding.weight.detach().clone()
    vq(cluster)  # pass 1: code 3 is used, the others count 1
    assert vq.steps_unused.tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    assert torch.equal(vq.embedding.weight, before)
    vq.eval()(cluster)  # evaluation neither counts nor restarts
    assert vq.steps_unused.tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    vq.train()(cluster)  # pass 2: the others reach 2
    assert torch.equal(vq.embedding.weight, before)
    vq(cluster)  # pass 3: the seven unused codes restart at latents of this batch, before the search
    moved = (vq.embedding.weight != before).any(dim=1)
    assert moved.tolist() == [True, True, True, False, True, True, True, True]
    assert _rows_in(vq.embedding.weight[moved].detach(), cluster)
    never = VQRAEVectorQuantizer(8, dim=2, restart_unused_steps=0).train()
    frozen = never.embedding.weight.detach().clone()
    for _ in range(5):
        never(cluster)
    assert torch.equal(never.embedding.weight, frozen) and (never.steps_unused == 0).all()


def test_restarts_keep_an_8_code_book_in_use_where_plain_vq_collapses():
    """Latents far from a small initial codebook: without restarts one code takes every latent."""
    torch.manual_seed(0)
    data = torch.randn(256, 2) * 3 + 20
    usage = {}
    for steps in (0, 2):
        torch.manual_seed(1)
        vq = VQRAEVectorQuantizer(8, dim=2, restart_unused_steps=steps).train()
        optimizer = torch.optim.SGD(vq.parameters(), lr=0.1)
        for _ in range(20):
            loss = vq(data).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        usage[steps] = vq.eval()(data).indices.unique().numel()
    assert usage[0] == 1 and usage[2] == 8


def test_cosine_lookup_searches_by_angle_and_decodes_unit_codes():
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(50, dim=6, cosine_lookup=True).eval()
    z = torch.randn(30, 6) * torch.rand(30, 1) * 10
    out = vq(z)
    similarity = F.normalize(z, dim=-1) @ F.normalize(vq.embedding.weight, dim=-1).t()
    assert torch.equal(out.indices, similarity.argmax(dim=1))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(30))
    torch.testing.assert_close(vq.lookup(out.indices), out.quantized)


def test_simvq_starts_at_the_identity_and_caches_its_codebook_between_updates():
    model = tiny_model(use_fsq=False, num_embeddings=300, use_simvq=True, codebook_dim=8)
    quantizer = model.quantizer
    assert torch.equal(quantizer.codebook_transform.weight, torch.eye(8))  # not 0.02-std: codes at unit scale
    norms = quantizer.frozen_codebook.norm(dim=1)
    assert 0.5 < float(norms.mean()) < 1.5
    model.eval()
    with torch.no_grad():
        first = quantizer.codebook
        assert quantizer.codebook is first  # no 300 x 8 x 8 product per call
        torch.testing.assert_close(first, quantizer.frozen_codebook @ quantizer.codebook_transform.weight.t())
        indices = torch.randint(300, (2, 4, 4))
        model.decode_from_indices(indices)
        assert quantizer.codebook is first
        quantizer.codebook_transform.weight.mul_(2)  # an optimiser step writes in place
        second = quantizer.codebook
    assert second is not first
    torch.testing.assert_close(second, 2 * first)
    with torch.enable_grad():
        assert quantizer.codebook.requires_grad  # training builds it in the graph, uncached


def test_codebooks_and_position_embeddings_get_no_weight_decay():
    for simvq in (False, True):
        model = tiny_model(use_fsq=False, num_embeddings=64, use_simvq=simvq, codebook_dim=8)
        decay, no_decay = _optimizer_groups(model, 0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay_names = {names[id(p)] for p in no_decay["params"]}
        codebook = "quantizer.codebook_transform.weight" if simvq else "quantizer.embedding.weight"
        assert codebook in no_decay_names and "decoder.position_embedding" in no_decay_names
        assert "quantizer.project_in.weight" in {names[id(p)] for p in decay["params"]}
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_usage_counts_travel_with_the_weights(tmp_path):
    from vqrae import VQRAEModel

    model = tiny_model(use_fsq=False, num_embeddings=64, codebook_dim=8).train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert (model.quantizer.steps_unused < 20).all()  # the first batch restarted (initialised) every code
    save_model(model, tmp_path)
    loaded = VQRAEModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.quantizer.steps_unused, model.quantizer.steps_unused)
    torch.testing.assert_close(loaded.quantizer.embedding.weight, model.quantizer.embedding.weight)


def _restart_worker(rank: int, world_size: int, port: int, results: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    # Five passes on each process's own data (and its own random state) from the same start, as DDP makes it.
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(32, dim=4, restart_unused_steps=2).train()
    torch.manual_seed(100 + rank)
    for _ in range(5):
        vq(torch.randn(6, 4) + 3 * rank)
    saved = {"codebook": vq.embedding.weight.detach().clone(), "counts": vq.steps_unused.clone()}
    # One pass in which codes 2..7 are due for a restart and codes 0 and 1 are not.
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(8, dim=2, restart_unused_steps=2).train()
    vq.steps_unused.copy_(torch.tensor([0, 0, 2, 2, 2, 2, 2, 2]))
    saved["before"] = vq.embedding.weight.detach().clone()
    torch.manual_seed(200 + rank)
    saved["batch"] = torch.randn(6, 2) + 10 * rank
    vq(saved["batch"])
    saved.update(after=vq.embedding.weight.detach().clone(), counts_after=vq.steps_unused.clone())
    torch.save(saved, f"{results}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What `_restart_worker` saw on each of 2 processes of a gloo group."""
    import socket

    import torch.multiprocessing as mp

    results = tmp_path_factory.mktemp("restarts")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_restart_worker, args=(2, port, str(results)), nprocs=2)
    return torch.load(results / "0.pt"), torch.load(results / "1.pt")


def test_every_process_keeps_the_same_codebook(two_processes):
    """Under torch.distributed the usage is summed and process 0's latents restart the codes, so processes that see
    different data (and draw different random numbers) still hold one codebook."""
    first, second = two_processes
    assert torch.equal(first["codebook"], second["codebook"])
    assert torch.equal(first["counts"], second["counts"])
    torch.manual_seed(0)
    assert not torch.equal(first["codebook"], VQRAEVectorQuantizer(32, dim=4, restart_unused_steps=2).embedding.weight)


def test_unused_codes_restart_at_process_0s_latents_under_torch_distributed(two_processes):
    first, second = two_processes
    assert torch.equal(first["before"], second["before"])
    for process in (first, second):
        # Codes 0 and 1 were in use and stay; codes 2..7 move to latents of process 0's batch, on both processes.
        assert torch.equal(process["after"][:2], process["before"][:2])
        assert (process["after"][2:] != process["before"][2:]).any(dim=1).all()
        assert _rows_in(process["after"][2:], first["batch"])
    assert torch.equal(first["after"], second["after"])
    assert torch.equal(first["counts_after"], second["counts_after"])
    # The usage of both processes counts: a code either of them chose is reset to 0.
    used = {int(i) for p in (first, second) for i in torch.cdist(p["batch"], first["after"]).argmin(dim=1)}
    assert {i for i, count in enumerate(first["counts_after"].tolist()) if count == 0} == used


def test_codebook_use_on_crops_counts_every_token_of_every_crop():
    model = tiny_model(seed=3).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8)) for i in range(3)]
    use = codebook_use_on_crops(model, images, model.get_image_processor(), num_crops=10, seed=0, batch_size=4)
    assert use["crops"] == 10 and use["tokens"] == 10 * 16 and use["codebook_size"] == 64000
    assert 1 <= use["used_codes"] <= 160
    assert use["codebook_utilization"] == pytest.approx(use["used_codes"] / 64000)
    again = codebook_use_on_crops(model, images, model.get_image_processor(), num_crops=10, seed=0, batch_size=3)
    assert again == use  # seeded crops: the same figures whatever the batch size
    with pytest.raises(ValueError, match="crops"):
        codebook_use_on_crops(model, images, model.get_image_processor(), num_crops=0)


def test_the_ema_copy_carries_the_trained_usage_counts():
    """The saved model is the EMA copy: integer buffers cannot be averaged, so they are copied; left at their
    initial value (every code unused) a fine-tuned model would restart its whole trained codebook."""
    from vqrae.training.state import ExponentialMovingAverage

    model = tiny_model(use_fsq=False, num_embeddings=64, codebook_dim=8).train()
    ema = ExponentialMovingAverage(model, decay=0.9)
    model(torch.rand(2, 3, 32, 32) * 2 - 1)
    ema.update(model)
    assert torch.equal(ema.model.quantizer.steps_unused, model.quantizer.steps_unused)
    assert (ema.model.quantizer.steps_unused < 20).all()

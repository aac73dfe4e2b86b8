"""Reference points for the engine's speed: FLOP counts, matmul rate, a plain PyTorch loop.

    rate = matmul_rate()                               # FLOP/s of float32 matmul, this thread count
    floor = model_epoch_flops(settings) / rate         # seconds per model-epoch at the matmul rate
    seconds = plain_loop_seconds(settings, data)       # one run with nn.Module + torch.optim
    with Gang(workers=2) as gang:                      # single-threaded processes, one per core
        total_rate = sum(gang.run("matmul", seconds=2.0))

``make bench`` (tests/benchmarks) measures these side by side with the engine.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace
from multiprocessing.connection import Connection

import torch
import torch.nn.functional as F
from torch import nn

from mnistbench.engine import DeviceData, Member, train_stack
from mnistbench.evaluation import SLAB, SLAB_CUTS, TILE
from mnistbench.matrix import Criteria, Settings
from mnistbench.seeds import generator
from mnistbench.features import IMAGE_PIXELS, zero_skipping_bands
from mnistbench.initialization import CONV_TAPS, NUM_CLASSES

MATMUL_SIZE = 1024  # square float32 matmul used to measure the machine's rate


def example_flops(settings: Settings, *, train: bool, share: float = 1.0) -> float:
    """Floating-point operations for one example, a multiply-add counted as 2.

    Training counts the forward pass and the backward pass: weight gradients of both
    Linear layers, the input gradient of the second, and of the first only when the
    convolution front needs it. Element-wise work (activations, loss, optimizer) is
    left out, so the count is a floor. ``share`` is the fraction of the first layer's
    inputs that are multiplied, and of the front's windows that are computed, as
    :func:`multiplied_shares` returns it.
    """
    n, width = settings.input_features(), settings.width
    conv = 2 * CONV_TAPS * (IMAGE_PIXELS - CONV_TAPS + 1) * share if settings.conv else 0
    first = 2 * n * width * share
    second = 2 * width * NUM_CLASSES
    forward = conv + first + second
    if not train:
        return forward
    backward = first + 2 * second + (first + conv if settings.conv else 0)
    return forward + backward


def model_epoch_flops(settings: Settings, train_size: int = 60_000, test_size: int = 10_000,
                      evaluations: int = 1, shares: tuple[float, float] = (1.0, 1.0)) -> int:
    """FLOPs of one model-epoch: training on ``train_size`` examples plus test evaluations.

    ``shares`` are the fractions of the first layer's inputs that are multiplied in
    training and in evaluation, from :func:`multiplied_shares`. The default counts
    every term.
    """
    train = example_flops(settings, train=True, share=shares[0])
    test = example_flops(settings, train=False, share=shares[1])
    return round(train_size * train + evaluations * test_size * test)


def multiplied_shares(settings: Settings, data: DeviceData, seeds: range) -> tuple[float, float]:
    """Return the fractions of the first layer's inputs that the engine multiplies on the CPU.

    Replays the batches of ``seeds`` and the evaluation slabs, and returns the share of
    inputs inside their zero-skipping bands, in training and in evaluation. With the
    convolution front these are also the shares of the front's windows that it computes.
    """
    arranged = data.arranged_inputs(settings.conv, settings.pool)
    features, batch = settings.input_features(), settings.batch_size
    subset = data.subset_indexes(settings.train_subset)
    size = data.train_labels.shape[0] if subset is None else subset.shape[0]
    multiplied = 0
    for seed in seeds:
        stream = generator(seed, "data")
        for _ in range(settings.epochs):  # the engine draws one order per epoch
            order = torch.randperm(size, generator=stream)
            order = order if subset is None else subset[order]
            for start in range(0, size, batch):
                extents = arranged.extent[order[start:start + batch]].sort().values.tolist()
                multiplied += _band_terms(zero_skipping_bands(extents), len(extents))
    train_share = multiplied / (len(seeds) * settings.epochs * size * features)
    extents = arranged.test_extent.tolist()
    multiplied = sum(
        _band_terms(zero_skipping_bands(extents[start:start + SLAB], SLAB_CUTS, align=TILE),
                    len(extents[start:start + SLAB]))
        for start in range(0, len(extents), SLAB))
    return train_share, multiplied / (len(extents) * features)


def _band_terms(bands, examples: int) -> int:
    return sum((examples - first) * (stop - start) for first, start, stop in bands)


def matmul_rate(size: int = MATMUL_SIZE, seconds: float = 1.0, device: str = "cpu") -> float:
    """Measure float32 matmul throughput in FLOP/s with torch's current thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    a @ b  # warm-up: thread pool and caches
    _synchronize(device)
    repeats, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10 if device == "cuda" else 1):
            a @ b
            repeats += 1
        _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PlainModel(nn.Module):
    """One run of the model family written the ordinary way, with nn.Conv1d and nn.Linear."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.conv = nn.Conv1d(1, 1, CONV_TAPS) if settings.conv else None
        self.first = nn.Linear(settings.input_features(), settings.width)
        self.second = nn.Linear(settings.width, NUM_CLASSES)
        self.activation = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                           "gelu": F.gelu}[settings.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.activation(self.conv(x[:, None, :])).squeeze(1)
        if self.settings.pool:
            x = F.max_pool1d(x[:, None, :], 2).squeeze(1)
        hidden = self.activation(self.first(x))
        hidden = F.dropout(hidden, self.settings.dropout, self.training)
        return self.second(hidden)


def plain_loop_seconds(settings: Settings, data: DeviceData, seed: int = 0,
                       device: str = "cpu") -> float:
    """Train one run with a plain PyTorch loop; return wall seconds for all its epochs.

    The images are preloaded as float32 on ``device`` and batches are indexed from
    them, as a careful hand-written loop would do. Like the engine, it evaluates on
    the test set before training and after each epoch.
    """
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # as the engine does, so that both pay the same arithmetic
    model = PlainModel(settings).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    subset = data.subset_indexes(settings.train_subset)
    images = data.train_images if subset is None else data.train_images[subset]
    labels = data.train_labels if subset is None else data.train_labels[subset]
    images = images.to(device).float() / 255.0
    labels = labels.to(device)
    test_images = data.test_images.to(device).float() / 255.0
    test_labels = data.test_labels.to(device)
    _synchronize(device)
    started = time.perf_counter()
    _evaluate(model, test_images, test_labels)
    for _ in range(settings.epochs):
        model.train()
        order = torch.randperm(labels.shape[0], device=device)
        for start in range(0, labels.shape[0], settings.batch_size):
            index = order[start:start + settings.batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _evaluate(model, test_images, test_labels)
    _synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def _evaluate(model: PlainModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()


BENCH_CELLS = {
    "mlp": Settings(activation="sigmoid", width=100, batch_size=128, lr=0.5, epochs=1),
    "conv": Settings(activation="sigmoid", width=100, batch_size=128, lr=0.5, epochs=1,
                     conv=True),
    "conv_pool": Settings(activation="sigmoid", width=100, batch_size=128, lr=0.5, epochs=1,
                          conv=True, pool=True),
}


def bench_variants(settings: Settings) -> list[Settings]:
    """Six runs per seed that differ the way an ablation's stack does: init x dropout."""
    return [replace(settings, init=init, dropout=dropout)
            for init in ("default", "kaiming", "large_normal") for dropout in (0.0, 0.5)]


def engine_seconds(settings: Settings, data: DeviceData, seeds: range,
                   device: str = "cpu") -> float:
    """Train the benchmark stack (``seeds`` x :func:`bench_variants`); return wall seconds."""
    members = [Member(f"bench-{i}-{seed}", seed, variant)
               for seed in seeds for i, variant in enumerate(bench_variants(settings))]
    provenance = {"package_version": "bench", "git_commit": "bench",
                  "torch_version": torch.__version__, "dataset_md5": data.md5}
    started = time.perf_counter()
    train_stack(members, data, Criteria(), provenance, device)
    _synchronize(device)
    return time.perf_counter() - started


class Gang:
    """Worker processes, one torch thread each, that run the same task side by side.

    This is how ``ablate`` fills a CPU: one single-threaded worker per core. The
    workers start once and keep the dataset loaded, so a timed :meth:`run` measures
    only the task. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int, test_subset: int | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=_gang_worker, args=(child, test_subset), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)
        self.run("ready")

    def run(self, task: str, **kwargs) -> list:
        """Send a task to every worker at once and return their results in worker order.

        Tasks: ``matmul`` (FLOP/s over ``seconds``), ``engine`` (wall seconds to train
        ``settings`` for the worker's own ``seeds_per_worker`` seeds), ``ready``.
        """
        for worker, connection in enumerate(self.connections):
            connection.send((task, worker, kwargs))
        try:
            results = [connection.recv() for connection in self.connections]
        except (EOFError, ConnectionError) as error:
            raise RuntimeError(
                f"a benchmark worker exited before returning a result for task {task!r}; "
                f"look for its error in the output above") from error
        failed = [result for result in results if isinstance(result, str)]
        if failed:
            raise RuntimeError(f"benchmark task {task!r} failed in a worker:\n{failed[0]}")
        return results

    def close(self) -> None:
        for connection in self.connections:
            connection.send(None)
        for process in self.processes:
            process.join(timeout=10)

    def __enter__(self) -> Gang:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _gang_worker(connection: Connection, test_subset: int | None) -> None:
    import traceback

    from mnistbench.data import load_dataset

    torch.set_num_threads(1)
    full = DeviceData.from_dataset(load_dataset("mnist", fetch=False), "cpu")
    data = DeviceData(full.train_images, full.train_labels, full.test_images[:test_subset],
                      full.test_labels[:test_subset], full.md5)
    while (message := connection.recv()) is not None:
        task, worker, kwargs = message
        try:
            if task == "matmul":
                connection.send(matmul_rate(seconds=kwargs["seconds"]))
            elif task == "engine":
                count = kwargs["seeds_per_worker"]
                connection.send(engine_seconds(kwargs["settings"], data,
                                               range(worker * count, (worker + 1) * count)))
            else:
                connection.send(0.0)
        except Exception:  # report to the parent instead of leaving it waiting
            connection.send(traceback.format_exc())

"""Decode seeded mutants of a ``.illm`` file, each in a child process, and count what happens.

    python scripts/fuzz_decode.py [--mutants 10000] [--seed 0] [--time-limit 20] [--memory-gb 2]

The file comes from a tiny random autoencoder (a 128x192 photo crop). Mutants are bit flips,
overwritten bytes, truncations and appended bytes (which the CRC catches), and forgeries with
the CRC recomputed: payload bytes edited, overwritten with runs of 0x00 or 0xff, replaced, cut or
extended, and image sizes edited. Children decode mutants one after another, under an
address-space cap of ``--memory-gb`` above what the loaded model takes; a watchdog kills a child
whose current mutant runs past ``--time-limit`` seconds. Each mutant ends as one of:

- decoded: an image of the header's size with values in [0, 1];
- documented: `IllmError` or a subclass (`FormatError`, `WeightsMismatchError`), one line;
- undocumented: any other exception, or a wrong image (the harness prints it);
- signal: the child died from a signal (a segfault, say);
- hang: the watchdog killed it.

tests/test_fuzz_decode.py runs a few hundred mutants in CI; the README reports a 10,000 run.
"""

import argparse
import collections
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

TINY = dict(latent_channels=8, hyper_channels=8, encoder_channels=(8, 8, 16, 16, 16), num_residual_blocks=1)
OUTCOMES = ("decoded", "documented", "undocumented", "signal", "hang")
FAILURES = ("undocumented", "signal", "hang")
_HEADER = 11  # bytes before the payload
_CRC = 4


def tiny_model():
    import torch

    from illm.models.hific import HiFiCAutoencoder

    torch.manual_seed(0)
    model = HiFiCAutoencoder(**TINY).eval()
    model.update(force=True)
    return model


def source_file() -> bytes:
    import torch
    from skimage import data

    from illm import codec
    from illm.images import to_float

    image = to_float(torch.from_numpy(data.chelsea()[60:188, 100:292].copy()).permute(2, 0, 1))
    return codec.compress(tiny_model(), image)


def forge(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def mutants(data: bytes, count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` (kind, bytes) mutants of ``data``, the same for the same seed."""
    rng = random.Random(seed)
    kinds = (
        [_bit_flips, _overwrite, _truncate, _append]
        + [_forged_payload] * 4
        + [_forged_size] * 2
        + [
            _forged_both,
            _forged_length,
        ]
    )
    for _ in range(count):
        kind = rng.choice(kinds)
        yield kind.__name__.strip("_"), kind(rng, data)


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _append(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randint(1, 2000))


def _edit_payload(rng: random.Random, payload: bytes) -> bytes:
    out = bytearray(payload)
    edit = rng.randrange(5)
    if edit == 0:  # a few random bytes
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif edit in (1, 2):  # a run of 0xff (endless escapes) or of zeros (a stuck coder state)
        start = rng.randrange(len(out))
        length = rng.randint(1, len(out) - start)
        out[start : start + length] = (b"\xff" if edit == 1 else b"\x00") * length
    elif edit == 3:  # all random
        out = bytearray(rng.randbytes(len(out)))
    else:  # bit flips
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _forged_payload(rng: random.Random, data: bytes) -> bytes:
    return forge(data[:_HEADER] + _edit_payload(rng, data[_HEADER:-_CRC]))


def _random_size(rng: random.Random, data: bytes) -> bytes:
    sides = [
        rng.randint(1, 16384),
        rng.randint(1, 16384),
        rng.randint(1, 300),
        rng.choice([16384, 8192, 4000]),
    ]
    height, width = rng.choice(sides), rng.choice(sides)
    return data[:7] + struct.pack(">HH", height, width)


def _forged_size(rng: random.Random, data: bytes) -> bytes:
    return forge(_random_size(rng, data) + data[_HEADER:-_CRC])


def _forged_both(rng: random.Random, data: bytes) -> bytes:
    return forge(_random_size(rng, data) + _edit_payload(rng, data[_HEADER:-_CRC]))


def _forged_length(rng: random.Random, data: bytes) -> bytes:
    payload = data[_HEADER:-_CRC]
    if rng.random() < 0.5:
        payload = payload[: rng.randrange(len(payload))]
    else:
        filler = rng.choice([b"\x00", b"\xff", None])
        extra = rng.randint(1, 4096)
        payload += rng.randbytes(extra) if filler is None else filler * extra
    return forge(data[:_HEADER] + payload)


# --- running mutants -------------------------------------------------------------------------


def run(
    mutant_bytes: list[bytes], time_limit: float, memory_gb: float, max_pixels: int | None = None
) -> list[tuple[str, str]]:
    """(outcome, detail) of decoding each mutant, in as few child processes as crashes allow."""
    results: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as folder:
        inputs, log = Path(folder) / "mutants.pkl", Path(folder) / "log.txt"
        inputs.write_bytes(pickle.dumps(mutant_bytes))
        while len(results) < len(mutant_bytes):
            results += _run_child(inputs, log, len(results), time_limit, memory_gb, max_pixels)
    return results


def _run_child(
    inputs: Path, log: Path, first: int, time_limit: float, memory_gb: float, max_pixels: int | None
) -> list[tuple[str, str]]:
    log.write_text("")
    command = [
        sys.executable,
        __file__,
        "--child",
        str(inputs),
        str(log),
        str(first),
        str(memory_gb),
        str(max_pixels),
    ]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: list[tuple[str, str]] = []
    current, since = None, time.monotonic()
    while True:
        done = child.poll() is not None
        for line in log.read_text().splitlines()[2 * len(results) + (current is not None) :]:
            fields = line.split(" ", 2)
            if fields[0] == "start":
                current, since = int(fields[1]), time.monotonic()
            else:
                results.append((fields[1], fields[2] if len(fields) > 2 else ""))
                current = None
        if done:
            break
        if current is not None and time.monotonic() - since > time_limit:
            child.kill()
            child.wait()
            return results + [("hang", f"over {time_limit:g} s")]
        time.sleep(0.02)
    if current is not None:  # died while decoding a mutant
        stderr = child.stderr.read().strip().splitlines()
        if child.returncode < 0:
            return results + [("signal", f"signal {-child.returncode}")]
        return results + [("undocumented", f"exit {child.returncode}: {stderr[-1] if stderr else ''}")]
    if child.returncode != 0 and not results:
        raise RuntimeError(f"the fuzzing child failed before its first mutant: {child.stderr.read()[-2000:]}")
    return results


def _child(inputs: str, log: str, first: str, memory_gb: str, max_pixels: str) -> None:
    import resource

    import torch

    from illm import codec
    from illm.errors import IllmError

    torch.set_num_threads(1)
    model = tiny_model()
    model_id = codec.weights_id(model)
    limits = {} if max_pixels == "None" else {"max_pixels": int(max_pixels)}
    mutant_bytes = pickle.loads(Path(inputs).read_bytes())
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    cap = used + int(float(memory_gb) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    with open(log, "a") as out:
        for index in range(int(first), len(mutant_bytes)):
            data = mutant_bytes[index]
            out.write(f"start {index}\n")
            out.flush()
            try:
                image = codec.decompress(model, data, model_id=model_id, **limits)
                header = codec.read_header(data)
                good = image.shape == (1, 3, header.height, header.width) and bool(
                    torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
                )
                outcome, detail = (
                    ("decoded", "") if good else ("undocumented", f"bad image {tuple(image.shape)}")
                )
            except IllmError as error:
                outcome, detail = "documented", f"{type(error).__name__}: {error}"
            except Exception as error:  # what the harness is looking for
                outcome, detail = "undocumented", f"{type(error).__name__}: {str(error)[:200]}"
            out.write(f"{index} {outcome} {' '.join(detail.split())}\n")
            out.flush()


def summary(kinds: list[str], results: list[tuple[str, str]]) -> str:
    counts = collections.Counter(outcome for outcome, _ in results)
    lines = [", ".join(f"{outcome}: {counts[outcome]}" for outcome in OUTCOMES)]
    by_kind = collections.defaultdict(collections.Counter)
    for kind, (outcome, _) in zip(kinds, results):
        by_kind[kind][outcome] += 1
    for kind in sorted(by_kind):
        lines.append(f"  {kind:15} " + ", ".join(f"{o} {n}" for o, n in sorted(by_kind[kind].items())))
    reasons = collections.Counter(
        detail.split(":")[0] + ": " + detail.split(":", 1)[-1][:60].strip()
        for outcome, detail in results
        if outcome == "documented"
    )
    lines.append("  most common errors:")
    lines += [f"    {n:6} {reason}" for reason, n in reasons.most_common(8)]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mutants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per mutant")
    parser.add_argument(
        "--memory-gb", type=float, default=2.0, help="address space per child above the model"
    )
    args = parser.parse_args()
    start = time.monotonic()
    data = source_file()
    kinds, mutant_bytes = zip(*mutants(data, args.mutants, args.seed))
    results = run(list(mutant_bytes), args.time_limit, args.memory_gb)
    print(
        f"{args.mutants} mutants of a {len(data)}-byte file (seed {args.seed}), "
        f"{time.monotonic() - start:.0f} s"
    )
    print(summary(list(kinds), results))
    failures = [(i, kind, r) for i, (kind, r) in enumerate(zip(kinds, results)) if r[0] in FAILURES]
    for index, kind, (outcome, detail) in failures[:20]:
        print(f"FAIL mutant {index} ({kind}): {outcome} {detail}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

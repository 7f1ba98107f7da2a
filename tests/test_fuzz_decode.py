"""Untrusted .illm files: seeded mutants never crash, hang or exhaust the decoder.

Each mutant is decoded in a child process (scripts/fuzz_decode.py) under an address-space cap,
with a watchdog per mutant; the script itself runs 10,000 of them (figures in the README).
"""

import runpy
import struct
import subprocess
import sys
import textwrap

import pytest

from helpers.paths import REPO

fuzz = runpy.run_path(str(REPO / "scripts" / "fuzz_decode.py"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source() -> bytes:
    return fuzz["source_file"]()


def test_seeded_mutants_decode_or_fail_with_a_documented_error(source):
    kinds, mutant_bytes = zip(*fuzz["mutants"](source, 300, seed=10))
    assert sum(kind.startswith("forged") for kind in kinds) > 150
    results = fuzz["run"](list(mutant_bytes), time_limit=20, memory_gb=2)
    failures = [(kind, result) for kind, result in zip(kinds, results) if result[0] in fuzz["FAILURES"]]
    assert failures == [], fuzz["summary"](list(kinds), results)
    outcomes = {outcome for outcome, _ in results}
    assert outcomes == {"decoded", "documented"}  # forged payloads do reach the coder


def test_known_attacks(source):
    forge, header = fuzz["forge"], source[:7]
    payload = source[11:-4]
    attacks = [
        forge(header + struct.pack(">HH", 16384, 8192) + payload),  # the 16384 x 8192 claim of issue 10
        forge(source[:11] + b"\xff" * len(payload)),  # endless escape runs
        forge(source[:11] + b"\x00" * len(payload)),  # a stuck coder state
        forge(source[:11] + payload[:16]),  # a cut payload
    ]
    results = fuzz["run"](attacks, time_limit=20, memory_gb=2, max_pixels=2**27)
    assert [outcome for outcome, _ in results] == ["documented"] * 4, results


def test_a_forged_large_image_decodes_in_bounded_memory(tmp_path):
    """A 9-megapixel claim with a payload of zeros decodes fully (every symbol costs one word
    of a stuck coder state), so the generator runs on the forged size: tiled, it stays under an
    address-space cap of 1 GB above the loaded model, which the untiled generator exceeds."""
    script = textwrap.dedent(
        f"""
        import resource, runpy, struct, sys
        fuzz = runpy.run_path({str(REPO / "scripts" / "fuzz_decode.py")!r})
        from illm import codec
        model = fuzz["tiny_model"]()
        model_id = codec.weights_id(model)
        height = width = 3000
        symbols = 8 * (height // 64 + 1) ** 2 * 17
        data = fuzz["forge"](b"\\x89I\\x01" + model_id + struct.pack(">HH", height, width) + bytes(4 * symbols))
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        cap = used + 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        tile = int(sys.argv[1]) if len(sys.argv) > 1 else None
        try:
            image = codec.decompress(model, data, model_id=model_id, tile=tile)
        except MemoryError:
            print("out of memory")
        except RuntimeError as error:
            print("out of memory" if "memory" in str(error) else repr(error))
        else:
            print(tuple(image.shape))
        """
    )
    path = tmp_path / "forged.py"
    path.write_text(script)
    tiled = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    assert tiled.stdout.strip() == "(1, 3, 3000, 3000)", tiled.stderr[-2000:]
    untiled = subprocess.run([sys.executable, str(path), "0"], capture_output=True, text=True, timeout=600)
    assert untiled.stdout.strip() == "out of memory", untiled.stderr[-2000:]

#!/usr/bin/env python3
"""The reference engines of benches/render_vs_libvips.rs, one per process.

    reference.py versions
    reference.py ENGINE FILE SIZES FORMAT ITERS WARMUP BUDGET_SECS

ENGINE is `libvips` (pyvips: `Image.thumbnail_buffer`, shrink-on-load, what
imgproxy does with a downloaded original) or `pillow` (`Image.draft` +
`thumbnail`, thumbor's engine). SIZES is a comma list of box sides; each
size is one thumbnail made from the original, as a proxy answering one
request per size does. FORMAT is jpeg, png or webp (JPEG and WebP at
quality 80; libvips strips metadata, as imgproxy and kiln do).

Runs WARMUP untimed jobs, then ITERS timed ones (stopping early after
BUDGET_SECS once 5 are done), and prints one JSON line: the median and min
ms per job, CPU ms per job, peak RSS above the baseline taken after the
input bytes were read (VmHWM reset through /proc/self/clear_refs), and the
outputs' sizes and dimensions.

libvips runs with VIPS_CONCURRENCY=1 (set by the driver) and its operation
cache off, so every job really decodes.
"""

import io
import json
import resource
import sys
import time


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_secs():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def versions():
    out = {}
    try:
        import pyvips

        out["libvips"] = "%d.%d.%d" % tuple(pyvips.version(i) for i in range(3))
        out["pyvips"] = pyvips.__version__
    except Exception as e:  # reported, not fatal here
        out["libvips"] = "unavailable: %s" % e
    try:
        import PIL
        from PIL import features

        out["pillow"] = PIL.__version__
        out["pillow_libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception as e:
        out["pillow"] = "unavailable: %s" % e
    print(json.dumps(out))


def libvips_job(sizes, fmt):
    import pyvips

    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    suffix = {"jpeg": ".jpg[Q=80,strip]", "png": ".png[strip]", "webp": ".webp[Q=80,strip]"}[fmt]

    def job(data):
        outs = []
        for size in sizes:
            thumb = pyvips.Image.thumbnail_buffer(data, size, height=size)
            outs.append((thumb.write_to_buffer(suffix), thumb.width, thumb.height))
        return outs

    return job


def pillow_job(sizes, fmt):
    from PIL import Image

    save = {"jpeg": ("JPEG", {"quality": 80}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 80})}[fmt]

    def job(data):
        outs = []
        for size in sizes:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (size, size))  # JPEG: DCT scaling; others: no-op
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, save[0], **save[1])
                outs.append((buf.getvalue(), im.width, im.height))
        return outs

    return job


def main():
    if sys.argv[1:] == ["versions"]:
        return versions()
    engine, path, sizes, fmt, iters, warmup, budget = sys.argv[1:8]
    sizes = [int(s) for s in sizes.split(",")]
    iters, warmup, budget = int(iters), int(warmup), float(budget)
    job = {"libvips": libvips_job, "pillow": pillow_job}[engine](sizes, fmt)
    with open(path, "rb") as f:
        data = f.read()
    peak_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        peak_reset = False
    baseline = status_kib("VmRSS")
    outs = []
    for _ in range(warmup):
        outs = job(data)
    times = []
    cpu0 = cpu_secs()
    started = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        outs = job(data)
        times.append((time.perf_counter() - t) * 1000.0)
        if len(times) >= 5 and time.perf_counter() - started > budget:
            break
    cpu = (cpu_secs() - cpu0) * 1000.0 / len(times)
    times.sort()
    n = len(times)
    med = times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2
    print(
        json.dumps(
            {
                "engine": engine,
                "iters": n,
                "ms_median": med,
                "ms_min": times[0],
                "cpu_ms": cpu,
                "baseline_kib": baseline,
                "peak_kib": status_kib("VmHWM") - baseline,
                "peak_reset": peak_reset,
                "out_bytes": [len(o[0]) for o in outs],
                "out_dims": [[o[1], o[2]] for o in outs],
            }
        )
    )


if __name__ == "__main__":
    main()

"""Builders for small WebDataset test shards with real image bytes (Pillow), and a corpus of bad shards.

Other tests import these as ``from corpus import ...`` (tests/ has no __init__.py, so pytest puts it on sys.path).

A *sample* here is ``(key, members)`` with ``members`` a dict ``{extension: content}`` written in dict order as
``<key>.<extension>``; content is bytes, a str (UTF-8 encoded) or a dict/list (JSON encoded).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import tarfile
import zlib
from pathlib import Path

from PIL import Image

_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(fmt: str = "jpg", color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (16, 16),
                mode: str = "RGB") -> bytes:
    """Encoded image bytes made with Pillow; ``fmt`` is a webdataset extension (jpg, jpeg, png, webp)."""
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color + (128,)).save(buf, format=_PIL_FORMATS[fmt])
    return buf.getvalue()


def sample(key: str, caption: str | None = None, fmt: str = "jpg", uid: str | None = None,
           with_json: bool = True) -> tuple[str, dict]:
    """A valid sample: an image in ``fmt`` (colour derived from the key), ``caption`` (default "a photo of <key>")
    and, when ``with_json``, a json member ``{"source": key}`` plus ``"uid"`` when given."""
    color = tuple(hashlib.sha1(key.encode()).digest()[:3])
    members = {fmt: image_bytes(fmt, color), "txt": caption if caption is not None else f"a photo of {key}"}
    if with_json:
        members["json"] = {"source": key, **({"uid": uid} if uid is not None else {})}
    return key, members


def variant(s: tuple[str, dict], key: str | None = None, **members) -> tuple[str, dict]:
    """A copy of sample ``s`` with members replaced (``txt=b"..."``), removed (``json=None``) or the key changed."""
    k, old = s
    new = {**old, **members}
    return key or k, {ext: v for ext, v in new.items() if v is not None}


def _encode(content) -> bytes:
    if isinstance(content, bytes):
        return content
    return content.encode() if isinstance(content, str) else json.dumps(content).encode()


def tar_bytes(samples, encoding: str = "utf-8") -> bytes:
    """An uncompressed tar (USTAR, mtime 0) holding the samples' members in order; member names written in
    ``encoding`` (latin-1 gives names that are not UTF-8 where they hold non-ASCII)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding=encoding) as tf:
        for key, members in samples:
            for ext, content in members.items():
                data = _encode(content)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(path, samples, gz: bool | None = None) -> Path:
    """Write ``samples`` as a tar shard at ``path``; gzip-compressed when ``gz`` (default: when the name ends
    in .gz or .tgz). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(samples)
    if gz if gz is not None else path.name.endswith((".gz", ".tgz")):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def make_good_shard(path, n: int = 4, prefix: str = "g", gz: bool | None = None) -> Path:
    """A shard of ``n`` valid samples ``<prefix>-000``...: even indices jpg with json uid ``<prefix>-uid-<i>``,
    odd indices png without a uid (so their uid is ``<shard basename>/<key>``)."""
    samples = [sample(f"{prefix}-{i:03d}", fmt="jpg" if i % 2 == 0 else "png",
                      uid=f"{prefix}-uid-{i:03d}" if i % 2 == 0 else None) for i in range(n)]
    return write_shard(path, samples, gz)


def _cut_inside(samples, member: str) -> tuple[bytes, int]:
    """The tar bytes of ``samples`` and an offset in the middle of ``member``'s data."""
    data = tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m = tf.getmember(member)
    return data, m.offset_data + m.size // 2


def make_bad_corpus(directory) -> dict[str, str]:
    """Write one small shard per defect under ``directory``; return {case name: shard path or URL}.

    Case (file): content -> what the reader must do
      truncated_tar (truncated.tar): t-000..t-003, file cut inside t-002.jpg -> keep t-000, t-001; 1 truncated_tar
      truncated_tgz (truncated.tar.gz): the same, but the gzip stream itself ends there (flushed, no trailer)
          -> keep t-000, t-001; 1 truncated_tar
      not_a_tar (not_a_tar.tar): text bytes -> keep nothing; 1 unreadable_shard
      not_image (not_image.tar): ni-000 ok; ni-001 .jpg holds text; ni-002 ok; ni-003 .png cut after 40 bytes
          -> keep ni-000, ni-002; 2 undecodable_image
      empty_caption (empty_caption.tar): ec-000 ok; ec-001 caption "  \\n\\t"; ec-002 caption ""
          -> keep ec-000; 2 empty_caption
      non_utf8_caption (non_utf8_caption.tar): nu-000 ok; nu-001 latin-1 bytes; nu-002 "café ☕" (valid UTF-8)
          -> keep nu-000, nu-002; 1 non_utf8_caption
      duplicate_key (duplicate_key.tar): dk-000, dk-001, dk-001 again (adjacent), dk-002, dk-000 again; repeats
          have caption "second copy" -> keep dk-000, dk-001, dk-002 (first copies); 2 duplicate_key
      missing_json (missing_json.tar): mj-000 ok; mj-001 without json -> keep both (json is optional)
      missing_txt (missing_txt.tar): mt-000 ok; mt-001 jpg+json only -> keep mt-000; 1 missing_caption
      missing_image (missing_image.tar): mi-000 ok; mi-001 txt+json only -> keep mi-000; 1 missing_image
      bad_json (bad_json.tar): bj-000 ok; bj-001 json "{not json"; bj-002 json "[1, 2]" (not an object)
          -> keep bj-000; 2 bad_json
      mixed (mixed.tar.gz): one of each per-sample defect: mx-000 ok, mx-001 text as .jpg, mx-002 empty caption,
          mx-003 latin-1 caption, mx-004 no txt, mx-005 no image, mx-006 invalid json, mx-007 ok without json,
          mx-000 again -> keep mx-000, mx-007; 1 each of undecodable_image, empty_caption, non_utf8_caption,
          missing_caption, missing_image, bad_json, duplicate_key
      non_utf8_name (non_utf8_name.tar): nn-000 ok; "café-001" with latin-1 member names; nn-002 ok
          -> keep nn-000, nn-002; 1 non_utf8_name (key recorded as caf\\xe9-001)
      unsafe_key (unsafe_key.tar): uk-000 ok; "../../uk-001" (a member that extracts outside its folder);
          "uk-\\x1b002" (a control character); uk-003 ok -> keep uk-000, uk-003; 2 unsafe_key
      pipe: ``pipe:cat <pipe_source.tar>``, a good shard made by ``make_good_shard(..., prefix="p")``
          -> keep p-000..p-003 when pipes are allowed
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}

    t = [sample(f"t-{i:03d}") for i in range(4)]
    data, cut = _cut_inside(t, "t-002.jpg")
    out["truncated_tar"] = d / "truncated.tar"
    out["truncated_tar"].write_bytes(data[:cut])
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container (header mtime 0)
    out["truncated_tgz"] = d / "truncated.tar.gz"
    out["truncated_tgz"].write_bytes(z.compress(data[:cut]) + z.flush(zlib.Z_FULL_FLUSH))
    out["not_a_tar"] = d / "not_a_tar.tar"
    out["not_a_tar"].write_bytes(b"this is not a tar archive\n" * 40)

    ok = sample
    cases = {
        "not_image": [ok("ni-000"), variant(ok("ni-001"), jpg=b"not a JPEG at all"), ok("ni-002"),
                      variant(ok("ni-003", fmt="png"), png=image_bytes("png")[:40])],
        "empty_caption": [ok("ec-000"), ok("ec-001", caption="  \n\t"), ok("ec-002", caption="")],
        "non_utf8_caption": [ok("nu-000"), variant(ok("nu-001"), txt="café".encode("latin-1")),
                             ok("nu-002", caption="café ☕")],
        "duplicate_key": [ok("dk-000"), ok("dk-001"), ok("dk-001", caption="second copy"), ok("dk-002"),
                          ok("dk-000", caption="second copy")],
        "missing_json": [ok("mj-000"), ok("mj-001", with_json=False)],
        "missing_txt": [ok("mt-000"), variant(ok("mt-001"), txt=None)],
        "missing_image": [ok("mi-000"), variant(ok("mi-001"), jpg=None)],
        "bad_json": [ok("bj-000"), variant(ok("bj-001"), json=b"{not json"), variant(ok("bj-002"), json=[1, 2])],
        "unsafe_key": [ok("uk-000"), ok("../../uk-001"), ok("uk-\x1b002"), ok("uk-003")],
    }
    for name, samples in cases.items():
        out[name] = write_shard(d / f"{name}.tar", samples)
    out["mixed"] = write_shard(d / "mixed.tar.gz", [
        ok("mx-000"), variant(ok("mx-001"), jpg=b"not a JPEG at all"), ok("mx-002", caption=" "),
        variant(ok("mx-003"), txt="café".encode("latin-1")), variant(ok("mx-004"), txt=None),
        variant(ok("mx-005"), jpg=None), variant(ok("mx-006"), json=b"{not json"),
        ok("mx-007", with_json=False), ok("mx-000", caption="second copy")])
    out["non_utf8_name"] = d / "non_utf8_name.tar"
    out["non_utf8_name"].write_bytes(tar_bytes([ok("nn-000"), ok("café-001"), ok("nn-002")], encoding="latin-1"))
    out["pipe"] = f"pipe:cat {shlex.quote(str(make_good_shard(d / 'pipe_source.tar', prefix='p')))}"
    return {k: str(v) for k, v in out.items()}

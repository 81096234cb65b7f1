"""Shared helpers of the dataset generators: espeak-ng speech synthesis, Opus encoding, packing.

Only the *generators* need espeak-ng (Debian package `espeak-ng`); reading the data needs nothing but
numpy and soundfile (libsndfile >= 1.0.29 decodes Ogg/Opus).
"""
import hashlib, io, subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
# English accents shipped with espeak-ng (the "gmw" voices) and the voice variants (!v/m1 ...) we combine
# them with. A *speaker* is one (accent, variant) pair: 8 x 12 = 96 speakers.
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
SPEAKERS = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
OPUS_LEVEL = 0.99  # libsndfile's Opus compression level (1.0 = lowest bitrate); 0.99 gives about 12 kbps at 16 kHz


def synth(text: str, speaker: str, speed: int, pitch: int) -> np.ndarray:
    "Speak `text` with espeak-ng and return float32 mono audio at 16 kHz, leading/trailing silence trimmed."
    wav = subprocess.run(["espeak-ng", "-v", speaker, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    import torch, torchaudio.functional as AF
    x = AF.resample(torch.from_numpy(x), sr, SAMPLE_RATE).numpy()
    return trim(x)


def trim(x: np.ndarray, thresh: float = 0.01, pad: float = 0.05) -> np.ndarray:
    "Cut leading/trailing samples quieter than `thresh` (abs amplitude), keeping `pad` seconds of margin."
    loud = np.flatnonzero(np.abs(x) > thresh)
    if len(loud) == 0: return x
    p = int(pad * SAMPLE_RATE)
    return x[max(0, loud[0] - p): loud[-1] + p]


def encode_opus(x: np.ndarray) -> bytes:
    "Encode float audio at 16 kHz as an Ogg/Opus file in memory (fixed stream serial: reproducible bytes)."
    b = io.BytesIO()
    sf.write(b, np.clip(x, -1, 1), SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=OPUS_LEVEL)
    return ogg_fixed_serial(b.getvalue())


def _ogg_crc_table():
    t = []
    for i in range(256):
        r = i << 24
        for _ in range(8): r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        t.append(r & 0xFFFFFFFF)
    return t
_OGG_CRC = _ogg_crc_table()


def ogg_crc(data: bytes) -> int:
    "Ogg page checksum: CRC-32, polynomial 0x04C11DB7, initial 0, not reflected."
    crc = 0
    for byte in data: crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) ^ byte) & 0xFF]
    return crc


def ogg_fixed_serial(data: bytes, serial: int = 0x6D6D6C62) -> bytes:
    "Replace the random stream serial number libsndfile writes into every Ogg page, and redo the page CRCs."
    out, pos = bytearray(data), 0
    while pos < len(out):
        if out[pos:pos + 4] != b"OggS": raise ValueError(f"not an Ogg page at byte {pos}")
        nseg = out[pos + 26]
        size = 27 + nseg + sum(out[pos + 27: pos + 27 + nseg])
        out[pos + 14: pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22: pos + 26] = bytes(4)
        out[pos + 22: pos + 26] = ogg_crc(bytes(out[pos: pos + size])).to_bytes(4, "little")
        pos += size
    return bytes(out)


def save_npz(path: Path, **arrays):
    "Like np.savez_compressed, but with fixed zip timestamps so the same arrays give the same bytes."
    import zipfile
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def decode(data: bytes) -> np.ndarray:
    x, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SAMPLE_RATE
    return x


def pack_bytes(blobs):
    "Concatenate byte strings into one uint8 array plus (n+1,) offsets (npz-friendly, no pickle)."
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def logmel_corr(x: np.ndarray, y: np.ndarray) -> float:
    "Pearson correlation of log-mel spectrograms of `x` and `y`, floored 40 dB below the peak (codec fidelity)."
    import torch, torchaudio
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=64)
    n = min(len(x), len(y))
    ma, mb = mel(torch.from_numpy(x[:n].copy())), mel(torch.from_numpy(y[:n].copy()))
    a = torch.log(ma + 1e-4 * ma.max()).flatten()
    b = torch.log(mb + 1e-4 * ma.max()).flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

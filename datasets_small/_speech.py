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
    "Encode float audio at 16 kHz as an Ogg/Opus file in memory."
    b = io.BytesIO()
    sf.write(b, np.clip(x, -1, 1), SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=OPUS_LEVEL)
    return b.getvalue()


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

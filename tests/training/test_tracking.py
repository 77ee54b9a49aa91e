"""The TensorBoard event writer produces valid CRC-framed records holding our scalars."""
import struct

from torchdiffusion.training.tracking import ScalarWriter, crc32c, read_metrics, read_records


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_event_file_and_jsonl(tmp_path):
    w = ScalarWriter(tmp_path)
    w.add_scalars(10, {"loss": 0.5})
    w.add_scalars(20, {"loss": 0.25, "lr": 1e-3})
    w.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    recs = read_records(files[0])
    assert len(recs) == 3 and b"brain.Event:2" in recs[0]
    assert b"loss" in recs[1] and struct.pack("<f", 0.5) in recs[1]
    assert b"lr" in recs[2] and struct.pack("<f", 0.25) in recs[2]
    assert [m["step"] for m in read_metrics(tmp_path)] == [10, 20]

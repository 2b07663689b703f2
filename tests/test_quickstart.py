import json

from chatmusician.corpora import nottingham_tunes
from chatmusician.quickstart import header_description, manifest_summary, write_corpora


def test_header_description_takes_the_first_value_of_each_described_field():
    tune = "X: 1\nT:A and D\nS:EF\nM:4/4\nK:A\nM:6/8\nP:A\nf|ecc c2f|"
    assert header_description(tune) == {"Title": "A and D", "Meter": "4/4", "Key": "A"}


def test_write_corpora_makes_pt_and_text_to_music_sft_rows(tmp_path):
    tunes = nottingham_tunes()[:3]
    pt, sft = write_corpora(tunes, tmp_path)
    pt_rows = [json.loads(line) for line in pt.read_text().splitlines()]
    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert [r["text"] for r in pt_rows] == tunes
    assert sft_rows[0]["output"] == tunes[0]
    assert sft_rows[0]["instruction"].startswith(
        "Using ABC notation, recreate the given text as a musical score.\n"
    )
    assert "\nMeter 3/4\nNote Length 1/4\nKey G" in sft_rows[0]["instruction"]


def test_manifest_summary_reads_the_manifest_contract():
    manifest = {"rows": {"read": 10, "rejected": 2}, "sequences": 7}
    assert manifest_summary(manifest) == {"rows_read": 10, "rows_rejected": 2, "sequences": 7}


def test_quickstart_yaml_gives_cpu_sized_stages_that_the_cli_can_override():
    from pathlib import Path

    from chatmusician.config import load_config
    from chatmusician.quickstart import QuickstartConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(QuickstartConfig, path, **{"sft.max_steps": 7})
    assert (cfg.pretrain.profile, cfg.pretrain.num_workers, cfg.pretrain.zero_stage) == ("cpu", 2, 2)
    assert cfg.pretrain.max_steps == 40 and cfg.sft.max_steps == 7
    assert cfg.pretrain.run_name != cfg.sft.run_name  # two runs, two checkpoint folders

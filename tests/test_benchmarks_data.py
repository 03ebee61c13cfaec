"""Benchmark data modules: shipped files, record mapping, slicing, bad-record reporting, batching."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from anyedit_lightning.benchmarks import (
    DATA_ENV,
    AKEWDataModule,
    BenchmarkDataError,
    CustomDataModule,
    EditEverythingDataModule,
    UnKEBenchDataModule,
    default_data_dir,
    get_datamodule,
    select_positions,
)
from anyedit_lightning.core.requests import EditRequest

DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED = {  # file: (records, sha256 from data/README.md)
    "UnKE/final_data_v2.json": (1000, "6e6f6e15af0bee684f3236ae8870b498783a1c581f5ec3e66f1b2a17c1fde4af"),
    "AKEW/MQuAKE-CF.json": (354, "8469d4a0b8a4ff4168de987576e7ecea4754202627cd3ab3181339ffc411ddc5"),
    "editevery.json": (552, "ae7c220344aa92cadeac496b11c1c8cc15905e8e6fe7489faae01a12b08ba3d6"),
}
EXTRA_KEYS = {"id", "index", "benchmark", "para_prompt", "sub_questions", "sub_answers", "category"}


def raw(file: str) -> list[dict]:
    return json.loads((DATA / file).read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _no_data_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)


@pytest.fixture(scope="module")
def unke() -> UnKEBenchDataModule:
    dm = UnKEBenchDataModule()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def mquake() -> AKEWDataModule:
    dm = AKEWDataModule()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def editevery() -> EditEverythingDataModule:
    dm = EditEverythingDataModule()
    dm.setup()
    return dm


# --------------------------------------------------------------------------- shipped files


def test_default_data_dir_is_repo_data_and_env_overrides(tmp_path: Path, monkeypatch) -> None:
    assert default_data_dir() == DATA
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        default_data_dir()


def test_shipped_counts_and_names(unke, mquake, editevery) -> None:
    for dm, name, file in [
        (unke, "unkebench", "UnKE/final_data_v2.json"),
        (mquake, "akew-mquake_cf", "AKEW/MQuAKE-CF.json"),
        (editevery, "editeverything", "editevery.json"),
    ]:
        assert dm.name == name
        assert len(dm.requests) == SHIPPED[file][0]
        assert [r.extra["index"] for r in dm.requests] == list(range(SHIPPED[file][0]))
        assert all(set(r.extra) == EXTRA_KEYS and r.extra["benchmark"] == name for r in dm.requests)


def test_unke_mapping(unke) -> None:
    record, request = raw("UnKE/final_data_v2.json")[0], unke.requests[0]
    assert request.prompt == "How can different animals perceive different colors?"
    assert request.prompt == record["question"] and request.target == record["answer"]
    assert not request.raw_prompt
    assert request.extra["id"] == 0 and request.extra["category"] is None
    assert request.extra["para_prompt"] == "In what ways do various animals perceive different colors?"
    assert request.extra["sub_questions"] == record["sub_question"]
    assert request.extra["sub_answers"] == record["sub_answer"]


def test_akew_mapping(mquake) -> None:
    rewrite, request = raw("AKEW/MQuAKE-CF.json")[0]["requested_rewrite"][0], mquake.requests[0]
    assert request.prompt == "What is the country of citizenship of Ellie Kemper?"
    assert request.target == rewrite["fact_new_uns"]
    assert request.extra["id"] == 1  # case_id, not the position
    assert request.extra["para_prompt"] is None
    assert request.extra["sub_questions"][:2] == ["Croatia is located in", "Ellie Kemper was born in"]
    assert request.extra["sub_answers"][:2] == ["Southeast Europe", "Kansas City, Missouri"]


def test_akew_sub_questions_are_first_five_formatted(mquake) -> None:
    for record, request in zip(raw("AKEW/MQuAKE-CF.json"), mquake.requests, strict=True):
        triplets = record["requested_rewrite"][0]["unsfact_triplets_GPT"][:5]
        assert request.extra["sub_questions"] == [t["prompt"].format(t["subject"]) for t in triplets]
        assert request.extra["sub_answers"] == [t["target"] for t in triplets]
        assert all("{}" not in q for q in request.extra["sub_questions"])
    counts = [len(r.extra["sub_questions"]) for r in mquake.requests]
    assert max(counts) == 5 and counts.count(5) > 250  # records with 3-4 triplets keep all of them


def test_editeverything_mapping(editevery) -> None:
    request = editevery.requests[10]
    assert request.extra["index"] == 10 and request.extra["id"] == 11  # the file's ids skip 10
    assert request.extra["category"] == "math"
    assert request.prompt == raw("editevery.json")[10]["question"]
    assert request.extra["para_prompt"] is None
    assert request.extra["sub_questions"] == [] and request.extra["sub_answers"] == []
    assert {r.extra["category"] for r in editevery.requests} == {
        "math", "code", "poetry", "news", "physics", "chemistry", "biology"
    }  # fmt: skip


def test_shipped_files_unmodified() -> None:
    for file, (_, digest) in SHIPPED.items():
        assert hashlib.sha256((DATA / file).read_bytes()).hexdigest() == digest, file


# --------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("cls", [UnKEBenchDataModule, AKEWDataModule, EditEverythingDataModule])
def test_start_limit_are_absolute_positions(cls) -> None:
    dm = cls(start=20, limit=10)
    assert [r.extra["index"] for r in dm.requests] == list(range(20, 30))


def test_splits(unke) -> None:
    dev = UnKEBenchDataModule(split="dev")
    assert [r.extra["index"] for r in dev.requests] == list(range(20))
    assert dev.requests[0].prompt == unke.requests[0].prompt
    test = UnKEBenchDataModule(split="test")
    assert len(test.requests) == 980 and test.requests[0].extra["index"] == 20
    narrowed = UnKEBenchDataModule(start=15, limit=10, split="dev")
    assert [r.extra["index"] for r in narrowed.requests] == list(range(15, 20))


def test_select_positions() -> None:
    assert select_positions(100, 20, 10) == range(20, 30)
    assert select_positions(25, 20, 10) == range(20, 25)
    assert select_positions(100, split="dev") == range(0, 20)
    assert select_positions(100, 15, 10, "test") == range(20, 25)
    assert len(select_positions(100, 30, None, "dev")) == 0
    assert len(select_positions(100, 0, 0)) == 0
    for bad in [{"start": -1}, {"limit": -2}, {"split": "train"}, {"start": 1.5}]:
        with pytest.raises(ValueError):
            select_positions(100, **bad)
    with pytest.raises(ValueError, match="batch_size"):
        UnKEBenchDataModule(batch_size=0)


# --------------------------------------------------------------------------- AKEW files not shipped


@pytest.mark.parametrize(
    ("subset", "file"), [("counterfact", "CounterFact.json"), ("wikiupdate", "WikiUpdate.json")]
)
def test_missing_unshipped_akew_file(tmp_path: Path, monkeypatch, subset: str, file: str) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        AKEWDataModule(subset=subset).setup()
    message = str(info.value)
    assert str(tmp_path / "AKEW" / file) in message
    assert "not shipped" in message and "path=" in message


def counterfact_record(case_id: int, **extra) -> dict:
    triplets = [{"subject": f"S{i}", "prompt": "{} plays", "target": f"T{i}"} for i in range(6)]
    rewrite = {
        "question": f"Q{case_id}?",
        "fact_new_uns": f"Long answer {case_id}.",
        "unsfact_triplets_GPT": triplets,
    }
    return {"case_id": case_id, "requested_rewrite": [rewrite], **extra}


def test_counterfact_supplied_by_path_with_paraphrases(tmp_path: Path) -> None:
    path = tmp_path / "cf.json"
    records = [counterfact_record(7, paraphrase_prompts=["P7a", "P7b"]), counterfact_record(8)]
    path.write_text(json.dumps(records))
    dm = get_datamodule("counterfact", path=path)
    assert isinstance(dm, AKEWDataModule) and dm.name == "akew-counterfact"
    first, second = dm.requests
    assert (first.prompt, first.target, first.extra["id"]) == ("Q7?", "Long answer 7.", 7)
    assert first.extra["para_prompt"] == "P7a" and second.extra["para_prompt"] is None
    assert first.extra["sub_questions"] == [f"S{i} plays" for i in range(5)]


def test_counterfact_found_at_default_location(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "AKEW").mkdir()
    (tmp_path / "AKEW" / "CounterFact.json").write_text(json.dumps([counterfact_record(1)]))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert [r.prompt for r in AKEWDataModule(subset="counterfact").requests] == ["Q1?"]


def test_akew_bad_records(tmp_path: Path) -> None:
    no_placeholder = counterfact_record(2)
    no_placeholder["requested_rewrite"][0]["unsfact_triplets_GPT"][1]["prompt"] = "plays"
    empty_target = counterfact_record(3)
    empty_target["requested_rewrite"][0]["fact_new_uns"] = "  "
    path = tmp_path / "cf.json"
    path.write_text(
        json.dumps([counterfact_record(1), no_placeholder, empty_target, {"requested_rewrite": []}])
    )
    with pytest.raises(BenchmarkDataError) as info:
        AKEWDataModule(subset="counterfact", path=path).setup()
    assert [i for i, _ in info.value.problems] == [1, 2, 3]
    assert "unsfact_triplets_GPT[1].prompt" in str(info.value) and "fact_new_uns" in str(info.value)


# --------------------------------------------------------------------------- custom files

GOOD = [
    {"question": "Q0?", "answer": "A0."},
    {
        "id": "x1",
        "question": "Q1?",
        "answer": "A1.",
        "para_question": "Q1 again?",
        "sub_question": ["s?"],
        "sub_answer": ["s."],
        "category": "news",
    },
]


def test_custom_json(tmp_path: Path) -> None:
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(GOOD))
    dm = get_datamodule(str(path), batch_size=2)
    assert isinstance(dm, CustomDataModule) and dm.name == "custom:edits.json"
    first, second = dm.requests
    assert (first.prompt, first.target, first.extra["id"]) == ("Q0?", "A0.", 0)
    assert first.extra["para_prompt"] is None
    assert first.extra["sub_questions"] == [] and first.extra["category"] is None
    assert second.extra == {
        "id": "x1",
        "index": 1,
        "benchmark": "custom:edits.json",
        "para_prompt": "Q1 again?",
        "sub_questions": ["s?"],
        "sub_answers": ["s."],
        "category": "news",
    }


def test_custom_json_takes_edit_request_fields_and_a_records_object(tmp_path: Path) -> None:
    fictional = get_datamodule(str(DATA / "fictional_edits.json"))
    raw = json.loads((DATA / "fictional_edits.json").read_text())["records"]
    assert [(r.prompt, r.target) for r in fictional.requests] == [(r["prompt"], r["target"]) for r in raw]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"records": [{"prompt": "P?", "target": "T."}, {"prompt": "P2?"}]}))
    with pytest.raises(BenchmarkDataError, match="record 1.*'target' is missing"):
        CustomDataModule(path).setup()
    path.write_text(json.dumps({"edits": []}))
    with pytest.raises(BenchmarkDataError, match="'records' is one"):
        CustomDataModule(path).setup()


def test_custom_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n\n")
    dm = CustomDataModule(path)
    assert dm.name == "custom:edits.jsonl"
    assert [(r.prompt, r.extra["index"]) for r in dm.requests] == [("Q0?", 0), ("Q1?", 1)]


BAD = [
    {"question": "Q0?", "answer": "A0."},
    {"question": "Q1?"},
    {"question": "Q2?", "answer": "A2."},
    {"question": "   ", "answer": "A3."},
    ["not", "an", "object"],
    {"question": "Q5?", "answer": "A5.", "sub_question": ["a?", "b?"], "sub_answer": ["a."]},
    {"question": "Q6?", "answer": 6},
]


def test_custom_bad_records_reported_with_index(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD))
    with pytest.raises(BenchmarkDataError) as info:
        CustomDataModule(path).setup()
    assert [i for i, _ in info.value.problems] == [1, 3, 4, 5, 6]
    message = str(info.value)
    assert "record 1: field 'answer' is missing" in message
    assert "record 3: field 'question' is empty" in message
    assert "record 6: field 'answer' must be a string" in message
    assert "skip_invalid=True" in message


def test_custom_skip_invalid_warns(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD))
    with pytest.warns(UserWarning, match=r"Skipped 5 bad record\(s\)") as caught:
        dm = CustomDataModule(path, skip_invalid=True)
        dm.setup()
    assert "record 4" in str(caught[0].message)
    assert [r.extra["index"] for r in dm.requests] == [0, 2]


def test_custom_only_selected_records_checked(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD))
    assert [r.prompt for r in CustomDataModule(path, limit=1).requests] == ["Q0?"]


def test_custom_jsonl_unreadable_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q0?", "answer": "A0."}\n{"question": oops}\n')
    with pytest.raises(BenchmarkDataError, match="record 1: line 2 is not valid JSON"):
        CustomDataModule(path).setup()


def test_custom_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=".json or .jsonl"):
        CustomDataModule(tmp_path / "edits.csv")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CustomDataModule(tmp_path / "missing.json").setup()
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"question": "Q?", "answer": "A."}))
    with pytest.raises(BenchmarkDataError, match="list of records"):
        CustomDataModule(path).setup()


# --------------------------------------------------------------------------- batching and factory


def test_batches_are_lists_of_requests() -> None:
    dm = EditEverythingDataModule(limit=7, batch_size=3)
    for loader in (dm.train_dataloader(), dm.predict_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert [len(b) for b in batches] == [3, 3, 1]
        assert all(type(b) is list and all(isinstance(r, EditRequest) for r in b) for b in batches)
        assert [r.extra["index"] for b in batches for r in b] == list(range(7))


def test_connect_sets_batch_size_and_reports_records_over_max_length(tmp_path: Path, tiny_tokenizer) -> None:
    """``connect`` hands over what only the model's owner knows; too-long records are bad records."""
    path = tmp_path / "edits.json"
    path.write_text(
        json.dumps([{"question": "Q0?", "answer": "A0."}, {"question": "Q1?", "answer": "A" * 200}])
    )
    dm = CustomDataModule(path, skip_invalid=True)
    assert len(dm) == 2  # read before connect: connect reads again with the new settings
    dm.connect(tiny_tokenizer, batch_size=2, max_length=64)
    with pytest.warns(
        UserWarning, match=r"record 1: prompt \+ target is \d+ tokens long, more than max_length \(64\)"
    ):
        assert [r.prompt for r in dm.requests] == ["Q0?"]
    assert dm.batch_size == 2 and dm.tokenizer is tiny_tokenizer
    dm.connect()  # None keeps every setting
    assert (dm.batch_size, dm.max_length) == (2, 64)
    with pytest.raises(ValueError, match="max_length"):
        dm.connect(max_length=0)


def test_get_datamodule(tmp_path: Path) -> None:
    assert isinstance(get_datamodule("unkebench"), UnKEBenchDataModule)
    assert isinstance(get_datamodule("EditEverything"), EditEverythingDataModule)
    for name, subset in [("akew", "mquake_cf"), ("mquake_cf", "mquake_cf"), ("wikiupdate", "wikiupdate")]:
        dm = get_datamodule(name)
        assert isinstance(dm, AKEWDataModule) and dm.subset == subset
    assert get_datamodule("akew", subset="counterfact").name == "akew-counterfact"
    assert get_datamodule("unkebench", start=3, limit=2).requests[0].extra["index"] == 3
    assert isinstance(get_datamodule(tmp_path / "mine.jsonl"), CustomDataModule)
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_datamodule("zsre")
    with pytest.raises(TypeError, match="subset"):
        get_datamodule("counterfact", subset="wikiupdate")
    with pytest.raises(ValueError, match="AKEW subset"):
        AKEWDataModule(subset="mquake")

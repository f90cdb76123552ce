"""The CLI: validate lists every bad row; user errors are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.cli import main


def test_validate_lists_every_bad_row(make_spec, capsys):
    rows = [
        {"prompt_id": "ok", "prompt": "a mug"},
        {"prompt_id": "../../x", "prompt": "y"},
        {"prompt_id": "ok", "prompt": "dup"},
        {"prompt_id": "n", "prompt": "z", "width": 12, "seed": -3},
    ]
    assert main(["validate", make_spec(rows)]) == 0
    out = capsys.readouterr().out
    assert "row 2 (prompt_id '../../x'): prompt_id: must be 1-128 characters" in out
    assert "row 3 (prompt_id 'ok'): prompt_id: duplicate of row 1" in out
    assert "row 4 (prompt_id 'n'): width: Input should be a multiple of 8" in out
    assert "row 4 (prompt_id 'n'): seed: Input should be greater than or equal to 0" in out
    assert "4 rows, 3 rejected, 0 blocked, 1 images to generate" in out


def test_validate_shows_prompts_the_screen_blocks(make_spec, capsys):
    rows = [{"prompt_id": "ok", "prompt": "a mug"}, {"prompt_id": "bad", "prompt": "a p 0 r n poster"}]
    assert main(["validate", make_spec(rows, scoring={"enabled": True})]) == 0
    out = capsys.readouterr().out
    assert "row 2 (prompt_id 'bad'): blocked by the prompt screen (sexual:porn*)" in out, out
    assert "2 rows, 0 rejected, 1 blocked, 1 images to generate" in out


def test_validate_and_dry_run_show_prompts_the_screen_will_hold_and_columns_that_look_misspelled(
    make_spec, tmp_path, capsys
):
    rules = tmp_path / "brand.yaml"
    rules.write_text("version: b-1\ncategories:\n  competitors: {action: review, terms: [acme*]}\n")
    rows = [{"prompt_id": "ok", "prompt": "a mug", "negative_promt": "blurry", "sede": 3},
            {"prompt_id": "rival", "prompt": "an acme mug"}]  # fmt: skip
    path = make_spec(rows, scoring={"enabled": False, "screen": {"blocklist": str(rules)}})
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "row 2 (prompt_id 'rival'): generated, then held for review by the prompt screen (competitors:acme*)" in out
    assert "2 rows, 0 rejected, 0 blocked, 2 images to generate (1 of them held for review by the prompt screen)" in out
    assert "column 'negative_promt': not a manifest column genpipe reads (kept as metadata); did you mean " \
           "'negative_prompt'?" in out and "column 'sede'" in out  # fmt: skip
    assert main(["run", path, "--dry-run"]) == 0
    assert "held for review by the prompt screen: 1 of those to generate" in capsys.readouterr().out


def test_invalid_spec_exits_non_zero_naming_the_key(make_spec, capsys):
    assert main(["validate", make_spec([{"prompt_id": "a", "prompt": "b"}], sampler={"stepz": 3})]) == 2
    err = capsys.readouterr().err
    assert "sampler.stepz: unknown key" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "validate"])
def test_missing_manifest_is_one_line(make_spec, tmp_path, capsys, command):
    spec = make_spec(manifest=str(tmp_path / "gone.parquet"), database=f"sqlite:///{tmp_path}/a.db")
    assert main([command, spec, "--set", "executor=local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genpipe: error: manifest ") and "gone.parquet: no such file" in err
    assert len(err.splitlines()) == 1


def test_set_override_error(make_spec, capsys):
    assert main(["validate", make_spec([]), "--set", "resources.batch_size=-2"]) == 2
    assert "resources.batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_run_dry_run_plans_against_the_audit_db_and_writes_nothing(make_spec, tmp_path, capsys):
    from pipeline.audit import AuditStore

    rows = [{"prompt_id": f"p{i}", "prompt": f"a mug, colour {i}"} for i in range(4)]
    rows += [{"prompt_id": "p0", "prompt": "dup"}, {"prompt_id": "bad", "prompt": "a p 0 r n poster"}]
    db = tmp_path / "audit.db"
    spec = make_spec(rows, database=f"sqlite:///{db}", scoring={"enabled": True})
    assert main(["run", spec, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "manifest rows: 6 (1 rejected)" in out, out
    assert "to generate 4, already done 0, newly rejected 1, newly blocked 1" in out, out
    assert "audit database: none yet" in out
    assert not db.exists() and not (tmp_path / "out").exists()  # nothing created, not even the database

    first = make_spec(rows[:2], database=f"sqlite:///{db}")  # generate two of them for real
    assert main(["run", first, "--quiet"]) == 0
    capsys.readouterr()
    store = AuditStore(f"sqlite:///{db}")
    before = (store.counts("test-job"), len(store.runs("test-job")))
    store.dispose()
    spec = make_spec(rows, database=f"sqlite:///{db}", scoring={"enabled": True})  # make_spec reuses its paths
    assert main(["run", spec, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to generate 2, already done 2, newly rejected 1, newly blocked 1" in out, out
    store = AuditStore(f"sqlite:///{db}")
    assert (store.counts("test-job"), len(store.runs("test-job"))) == before  # no run, no record
    store.dispose()


def test_run_dry_run_fails_when_the_audit_db_cannot_be_read(make_spec, tmp_path, capsys):
    """'Nothing done' only when there is no database yet; an unreachable one is an error, as in a real run."""
    spec = make_spec([{"prompt_id": "a", "prompt": "a mug"}], database="postgresql://u:pw@127.0.0.1:1/nodb")
    assert main(["run", spec, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot open audit DB" in err and "pw" not in err and "Traceback" not in err


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_run_dry_run_on_a_database_without_audit_tables_finds_nothing_done(make_spec, tmp_path, capsys, backend):
    """A new, empty database (a real run would create the tables in it) is 'nothing done', not an error."""
    from contextlib import nullcontext

    from tests.pg import fresh_database

    empty = tmp_path / "empty.db"
    empty.touch()
    with fresh_database() if backend == "postgres" else nullcontext(f"sqlite:///{empty}") as url:
        spec = make_spec([{"prompt_id": "a", "prompt": "a mug"}], database=url)
        assert main(["run", spec, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "to generate 1, already done 0" in out and "audit database: none yet" in out, out
        assert main(["run", spec, "--quiet"]) == 0  # and a real run sets the database up itself
        capsys.readouterr()
        assert main(["run", spec, "--dry-run"]) == 0
        assert "to generate 0, already done 1" in capsys.readouterr().out


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused_before_anything_runs(make_spec, tmp_path, capsys, url):
    assert main(["run", make_spec([{"prompt_id": "a", "prompt": "a mug"}], database=url)]) == 2
    err = capsys.readouterr().err
    assert "database: an in-memory SQLite database is per connection" in err


@pytest.mark.parametrize("command", [["validate"], ["run"], ["run", "--dry-run"]])
def test_an_output_without_a_database_or_a_filesystem_is_one_line(make_spec, tmp_path, capsys, command):
    rows = [{"prompt_id": "p0", "prompt": "a red mug"}]
    cases = [
        ({"output": "gs://bucket/runs"}, "genpipe: error: database: required when output is not a local path"),
        ({"output": "nosuchproto://x/runs", "database": f"sqlite:///{tmp_path}/a.db"},
         "genpipe: error: output: 'nosuchproto://x/runs': Protocol not known: nosuchproto"),
    ]  # fmt: skip
    if importlib.util.find_spec("gcsfs") is None:
        cases.append(({"output": "gs://bucket/runs", "database": f"sqlite:///{tmp_path}/a.db"},
                      "genpipe: error: output: 'gs://bucket/runs': Please install gcsfs"))  # fmt: skip
    for overrides, message in cases:
        assert main([command[0], make_spec(rows, **overrides), *command[1:]]) == 2, overrides
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_audit_export_to_a_filesystem_that_is_not_installed_is_one_line(tmp_path, capsys):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    db = f"sqlite:///{tmp_path}/audit.db"
    assert main(["audit", "migrate", "--db", db]) == 0
    capsys.readouterr()
    assert main(["audit", "export", "--db", db, "--approved", "--out", "gs://b/x.parquet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpipe: error: --out gs://b/x.parquet: cannot write: Please install gcsfs"), err


def test_a_local_run_asking_for_a_gpu_where_there_is_none_is_refused(make_spec, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = make_spec([{"prompt_id": "p0", "prompt": "a red mug"}], resources={"gpus_per_actor": 1})
    assert main(["validate", path]) == 2
    assert capsys.readouterr().err.startswith(
        "genpipe: error: resources.gpus_per_actor: 1 GPU(s) asked for, but torch sees no CUDA device here"
    )


@pytest.mark.parametrize("command", [["validate"], ["run"], ["run", "--dry-run"]])
def test_an_output_that_cannot_be_written_is_one_line(make_spec, tmp_path, capsys, command):
    (tmp_path / "a-file").write_text("in the way")
    rows = [{"prompt_id": "p0", "prompt": "a red mug"}]
    path = make_spec(rows, output=str(tmp_path / "a-file" / "runs"), database=f"sqlite:///{tmp_path}/a.db")
    assert main([command[0], path, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err == f"genpipe: error: output: {str(tmp_path / 'a-file' / 'runs')!r} cannot be written: " \
                  f"{str(tmp_path / 'a-file')!r} is a file\n"  # fmt: skip

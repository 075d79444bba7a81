"""``ur4rec text generate|audit``: user and item texts of a run, and their leakage audit."""

from __future__ import annotations

import argparse
from pathlib import Path

from ur4rec.cli import _config_arguments, _load_config
from ur4rec.config import Config
from ur4rec.data import load_dataset
from ur4rec.data.dataset import SequenceDataset
from ur4rec.rundir import RunDirError, prepare_run
from ur4rec.text.audit import LeakAudit, audit_user_texts, write_audit_csv
from ur4rec.text.generate import generate_texts, read_texts, texts_dir


def register(subparsers) -> None:
    text = subparsers.add_parser("text", help="user-preference paragraphs and item descriptions")
    actions = text.add_subparsers(metavar="action")

    generate = actions.add_parser("generate", help="generate (or import) every user and item text into RUN/texts/")
    run_arguments(generate)
    generate.add_argument("--force", action="store_true", help="regenerate texts this backend already cached")
    generate.set_defaults(handler=command_text_generate)

    audit = actions.add_parser("audit", help="find user texts that name the user's validation or test item")
    run_arguments(audit)
    audit.add_argument("--texts", type=Path, metavar="FOLDER",
                       help="audit the texts in FOLDER (user_texts.json or user_preferences.json) "
                            "instead of RUN/texts/")
    audit.set_defaults(handler=command_text_audit)


def run_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory to write")


def open_run(args) -> tuple[Config, SequenceDataset, Path]:
    """(config, dataset, run dir) with config.yaml and data.json written; another dataset's run is an error."""
    config = _load_config(args)
    dataset = load_dataset(config.data)
    try:
        run_dir = prepare_run(args.run_dir, config, dataset)
    except RunDirError as error:
        raise ValueError(str(error)) from error
    return config, dataset, run_dir


def command_text_generate(args) -> int:
    config, dataset, run_dir = open_run(args)
    texts = generate_texts(config, dataset, run_dir, force=args.force, progress=config.train.progress)
    print(f"{texts.backend}: {len(texts.users)} of {dataset.n_users} users and {len(texts.items)} of "
          f"{dataset.n_items} items have a text ({texts.generated} generated, {texts.reused} from the cache)")
    audit = audit_user_texts(texts.users, dataset)
    write_audit_csv(audit, texts_dir(run_dir) / "audit.csv")
    print_audit(audit, dataset)
    print(f"texts in {texts_dir(run_dir).resolve()}")
    return 0


def command_text_audit(args) -> int:
    config, dataset, run_dir = open_run(args)
    users, _ = read_texts(args.texts if args.texts else texts_dir(run_dir))
    audit = audit_user_texts(users, dataset)
    path = texts_dir(run_dir) / "audit.csv"
    write_audit_csv(audit, path)
    print_audit(audit, dataset)
    print(f"audit written to {path}")
    return 0


def print_audit(audit: LeakAudit, dataset: SequenceDataset) -> None:
    counts = audit.counts()
    print(f"leakage audit of {counts['user_texts']} user texts ({dataset.name}):")
    print(f"  name their validation item  {counts['names_valid_item']}")
    print(f"  name their test item        {counts['names_test_item']}")
    print(f"  name either                 {counts['names_either']}")
    print(f"  held-out titles too generic to audit: {counts['unauditable_held_out_titles']}; "
          f"also titles of a train item (not counted): {counts['held_out_titles_also_in_train']}")

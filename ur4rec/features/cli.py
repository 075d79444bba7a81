"""``ur4rec features text|image|quality``: build a run's features and measure them."""

from __future__ import annotations

from pathlib import Path

from ur4rec.text.cli import open_run, run_arguments


def register(subparsers) -> None:
    features = subparsers.add_parser("features", help="semantic and visual item features")
    actions = features.add_subparsers(metavar="action")

    text = actions.add_parser("text", help="encode item and user texts (generating them if needed)")
    run_arguments(text)
    text.add_argument("--force", action="store_true", help="re-encode even when the feature store has them")
    text.set_defaults(handler=command_features_text)

    image = actions.add_parser("image", help="encode the item images of features.image_folder")
    run_arguments(image)
    image.add_argument("--force", action="store_true", help="re-encode even when the feature store has them")
    image.set_defaults(handler=command_features_image)

    quality = actions.add_parser("quality", help="coverage, within-user lift, genre agreement, 2-D projection")
    run_arguments(quality)
    quality.add_argument("--k", type=int, default=10, help="neighbours for genre agreement")
    quality.set_defaults(handler=command_features_quality)


def command_features_text(args) -> int:
    from ur4rec.features import build_text_features, describe_entry

    config, dataset, run_dir = open_run(args)
    entry = build_text_features(config, dataset, run_dir, force=args.force, progress=config.train.progress)
    print(describe_entry(entry))
    print(f"run manifest: {Path(run_dir, 'features', 'manifest.json').resolve()}")
    return 0


def command_features_image(args) -> int:
    from ur4rec.features import build_image_features, describe_entry

    config, dataset, run_dir = open_run(args)
    entry = build_image_features(config, dataset, run_dir, force=args.force, progress=config.train.progress)
    print(describe_entry(entry))
    if entry["missing_images"] or entry["unreadable_images"]:
        print(f"  masked: {entry['missing_images']} items without an image, "
              f"{len(entry['unreadable_images'])} unreadable files")
    return 0


def command_features_quality(args) -> int:
    from ur4rec.features import load_features
    from ur4rec.features.quality import format_quality, write_quality

    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    config, dataset, run_dir = open_run(args)
    quality = write_quality(run_dir, load_features(run_dir, dataset), dataset, k=args.k)
    print(format_quality(quality))
    print(f"written: {Path(run_dir, 'features', 'quality.json').resolve()} and projection.csv")
    return 0

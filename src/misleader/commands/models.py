"""misleader models: list the registered architectures and datasets."""

from __future__ import annotations


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("models", help="list architectures and datasets")
    p.set_defaults(func=run)


def run(args) -> int:  # noqa: ANN001
    from misleader.data import list_datasets
    from misleader.models import count_parameters, create_model, list_models

    for name in list_models():
        n = count_parameters(create_model(name, in_channels=3, num_classes=10))
        print(f"{name:16s} {n/1e6:8.3f}M parameters (3x32x32, 10 classes)")
    print("datasets:", ", ".join(list_datasets()))
    return 0

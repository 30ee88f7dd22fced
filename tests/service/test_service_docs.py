"""service/README.md documents every setting (the deployment files are written from it)."""

from pathlib import Path

from service.settings import Settings


def test_every_setting_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[2] / "service" / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"`{name.upper()}`" in readme, f"{name.upper()} is missing from service/README.md"

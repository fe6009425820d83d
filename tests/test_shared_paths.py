from tests.shared_paths import FIXTURES, IN_CI, WIKITEXT


def test_shared_material_is_present_in_ci():
    """CI must see the fixtures and WikiText-2 (no fixture test may pass by having nothing to run)."""
    present = FIXTURES.is_dir() and any(FIXTURES.glob("*/config.json")) and (WIKITEXT / "test.txt").is_file()
    assert present or not IN_CI, f"CI runs without ../shared: {FIXTURES}, {WIKITEXT}"

"""Counts in the messages users read are written as people write them."""

from marrowdx.wording import quantity


def test_a_count_of_one_takes_the_singular_and_any_other_the_plural() -> None:
    assert quantity(1, "red cell") == "1 red cell"
    assert quantity(3, "red cell") == "3 red cells"
    assert quantity(0, "processed image") == "0 processed images"
    assert quantity(2, "nucleus", "nuclei") == "2 nuclei"

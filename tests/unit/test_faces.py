"""Alignment geometry (pure): the similarity estimate, the template, the warp, the main face."""

from __future__ import annotations

import numpy as np
import pytest

from distill.embed.faces import TEMPLATE_112, Face, align, load_detector, main_face, parse_points, similarity, template


def _similarity_matrix(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]], [0, 0, 1.0]])


@pytest.mark.parametrize("angle,scale,shift", [(0.3, 1.7, (12.0, -5.0)), (-1.1, 0.45, (200.0, 31.5)), (0.0, 1.0, (0, 0))])
def test_the_similarity_estimate_recovers_a_known_rotation_scale_and_shift(angle, scale, shift):
    m = _similarity_matrix(angle, scale, shift)
    src = TEMPLATE_112 + np.array([3.0, -2.0])
    dst = (m @ np.c_[src, np.ones(5)].T).T[:, :2]
    np.testing.assert_allclose(similarity(src, dst), m, atol=1e-9)


def test_the_template_is_insightfaces_and_scales_with_the_size():
    np.testing.assert_allclose(template(112), TEMPLATE_112)
    np.testing.assert_allclose(template(224), 2 * TEMPLATE_112)
    np.testing.assert_allclose(similarity(TEMPLATE_112, template(112)), np.eye(3), atol=1e-9)
    with pytest.raises(ValueError, match="--size"):
        template(16)


def test_align_puts_the_landmarks_on_the_template():
    """A photo whose face sits rotated, scaled and shifted: after alignment a marker drawn at
    each landmark sits at the template's point."""
    m = _similarity_matrix(0.4, 2.3, (60.0, 20.0))
    points = (m @ np.c_[TEMPLATE_112, np.ones(5)].T).T[:, :2]  # where the template's points fall in the photo
    photo = np.zeros((360, 300, 3), np.uint8)
    for k, (x, y) in enumerate(points):
        photo[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = 50 * (k + 1)
    out = align(photo, points, 112)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    for k, (x, y) in enumerate(TEMPLATE_112):
        assert abs(int(out[int(round(y)), int(round(x)), 0]) - 50 * (k + 1)) <= 5, k
    assert out[0, 0].tolist() == [0, 0, 0]  # outside the photo: black


def test_the_main_face_weighs_confidence_area_and_the_centre():
    pts = np.zeros((5, 2))
    big_edge = Face((0, 0, 100, 100), pts, 0.99)
    centred = Face((150, 150, 230, 230), pts, 0.98)
    tiny = Face((180, 180, 190, 190), pts, 1.0)
    assert main_face([big_edge, centred, tiny], (380, 380)) == 1
    assert main_face([tiny], (380, 380)) == 0 and main_face([], (10, 10)) is None
    unsure = Face((150, 150, 230, 230), pts, 0.2)
    assert main_face([big_edge, unsure], (380, 380)) == 0


def test_points_and_detector_specs():
    assert parse_points(range(10)).tolist()[1] == [2.0, 3.0]
    with pytest.raises(ValueError, match="10 numbers"):
        parse_points(range(8))
    for bad in ("retinaface", "nosuchmodule:f", "distill.embed.faces:nothing_here"):
        with pytest.raises(ValueError, match="--detector"):
            load_detector(bad)


def test_landmark_files_celeba_and_face2rec2_are_read_and_bad_lines_refused_with_their_number():
    from distill.embed.align import parse_landmarks
    from distill.errors import BadOption

    celeba = ("2\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
              "rightmouth_y\n000001.jpg 69 109 106 113 77 142 73 152 108 154\n000002.jpg 69 110 107 112 81 135 70 151 "
              "108 153\n")
    got = parse_landmarks(celeba, "list_landmarks_celeba.txt")
    assert got["000001.jpg"] == (69, 109, 106, 113, 77, 142, 73, 152, 108, 154) and len(got) == 2
    lst = "1\tpeople/a/1.jpg\t0\t10 20 90 110\t30 50 70 50 50 70 35 90 65 90\n"
    assert parse_landmarks(lst, "train.lst") == {"1.jpg": (30, 50, 70, 50, 50, 70, 35, 90, 65, 90)}
    with pytest.raises(BadOption, match=r"list.txt:5: not a landmarks line"):
        parse_landmarks(celeba + "000003.jpg 1 2 3\n", "list.txt")
    with pytest.raises(BadOption, match="holds no landmarks"):
        parse_landmarks("2\nheader\n", "empty.txt")

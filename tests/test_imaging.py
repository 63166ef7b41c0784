"""CT imaging: reading (DICOM/TIFF/PNG/JPEG), value-range detection, windowing and rendering, on hand-computed pixels."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctiqa import CTIQAError, CTIQAWarning
from ctiqa.cli import main
from ctiqa.imaging import (
    ENCODINGS,
    MIN_IMAGE_SIZE,
    CTImage,
    check_model_image,
    encoding_info,
    hu_to_unit,
    read_ct,
    read_ct_frames,
    read_dicom_folder,
    read_dicom_series,
    render,
    unit_to_hu,
    window,
)


def tile(a, side=MIN_IMAGE_SIZE):
    """Repeat a small pattern of hand-computed values to at least ``side`` pixels per side (the reader's size
    floor); the pattern stays at the top left: ``tile(a)[:h, :w] == a``."""
    a = np.asarray(a)
    h, w = a.shape[:2]
    return np.tile(a, (-(-side // h), -(-side // w)) + (1,) * (a.ndim - 2))


def top(x, like):
    """The top-left block of ``x`` with the (H, W) of ``like`` (undo :func:`tile`), as a list."""
    h, w = np.asarray(like).shape[:2]
    return np.asarray(x)[:h, :w].tolist()


def write_ct_dicom(path, raw, *, intercept=-1024.0, slope=1.0, position=(0.0, 0.0, 0.0), instance=1,
                   orientation=(1, 0, 0, 0, 1, 0), window_center=None, window_width=None, modality="CT",
                   signed=False):
    """A minimal CT DICOM file with the given stored (raw) pixel values, tiled to the size floor, uncompressed. A
    constant pattern gets its bottom-right pixel + 1 (a constant image is refused: nothing to assess)."""
    raw = tile(np.asarray(raw, dtype=np.int16 if signed else np.uint16)).copy()
    if raw.min() == raw.max():
        raw[-1, -1] += 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    if intercept is not None:
        ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    if window_center is not None:
        ds.WindowCenter, ds.WindowWidth = window_center, window_width
    ds.PixelData = raw.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _testdata(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} needs pydicom-data")
    return path


# ---------------------------------------------------------------------------------------------- window / units


def test_window_golden_values():
    hu = np.array([-1000, -135, -134, -100, 40, 214, 215, 3000])
    # 255 * (HU + 135) / 350, clipped, rounded half up:
    # -134 -> 0.73 -> 1; -100 -> 25.5 -> 26; 40 -> 127.5 -> 128; 214 -> 254.27 -> 254
    assert window(hu, 40, 350).tolist() == [0, 0, 1, 26, 128, 254, 255, 255]
    assert window(hu, 40, 350).dtype == np.uint8
    # no integer overflow for uint16 / int16 input
    assert window(np.array([65535], dtype=np.uint16), 0, 2048).tolist() == [255]
    with pytest.raises(ValueError):
        window(hu, 40, 0)


def test_hu_unit_round_trip_and_render_consistency():
    hu = np.arange(-135, 216, dtype=np.float64)
    x = hu_to_unit(hu)
    assert x.dtype == np.float32 and x.min() == 0 and x.max() == 1
    np.testing.assert_allclose(unit_to_hu(x), hu, atol=1e-3)
    assert hu_to_unit(np.array([-1000.0, 1000.0])).tolist() == [0.0, 1.0]
    # the LDCTIQA path ([0,1] -> round(255x)) and the HU path (window L40/W350) give the same grey
    unit_grey = np.asarray(render(CTImage(x[None, :], "unit", "u")))[0, :, 0]
    hu_grey = np.asarray(render(CTImage(hu[None, :], "hu", "h")))[0, :, 0]
    assert np.abs(unit_grey.astype(int) - hu_grey.astype(int)).max() <= 1
    assert (unit_grey == hu_grey).mean() > 0.99


def test_encoding_info_is_recorded_and_json():
    for name in ENCODINGS:
        info = encoding_info(name)
        assert info["name"] == name and len(info["channels"]) == 3
        json.dumps(info)
    assert [(c["lo_hu"], c["hi_hu"]) for c in encoding_info("medgemma-3window")["channels"]] == [
        (-1024, 1024), (-135, 215), (0, 80)]
    with pytest.raises(CTIQAError, match="unknown encoding"):
        encoding_info("lung")


# ---------------------------------------------------------------------------------------------- DICOM


def test_dicom_uint16_with_intercept_minus_1024_golden(tmp_path):
    # stored 0, 1023, 1024, 1064, 1239, 4095 -> HU -1024, -1, 0, 40, 215, 3071 (uint16 + negative intercept)
    raw = np.array([[0, 1023, 1024], [1064, 1239, 4095]])
    path = write_ct_dicom(tmp_path / "a.dcm", raw, window_center=[40, 400], window_width=[350, 1500])
    img = read_ct(path)
    assert img.kind == "hu" and img.pixels.dtype == np.float32 and img.shape == (16, 18) and img.notes == []
    assert top(img.pixels, raw) == [[-1024, -1, 0], [40, 215, 3071]]
    # soft tissue: 255*(HU+135)/350 -> 0, 97.6->98, 98.4->98, 127.5->128, 255, 255
    rgb = np.asarray(render(path))
    assert rgb.shape == (16, 18, 3) and rgb.dtype == np.uint8
    assert top(rgb[..., 0], raw) == [[0, 98, 98], [128, 255, 255]]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # medgemma 3-window: R = 255*(HU+1024)/2048, G = soft tissue, B = 255*HU/80
    rgb3 = np.asarray(render(path, "medgemma-3window"))
    assert top(rgb3[..., 0], raw) == [[0, 127, 128], [132, 154, 255]]
    assert top(rgb3[..., 1], raw) == [[0, 98, 98], [128, 255, 255]]
    assert top(rgb3[..., 2], raw) == [[0, 0, 0], [128, 255, 255]]


def test_dicom_slope_and_signed_storage(tmp_path):
    path = write_ct_dicom(tmp_path / "s.dcm", [[-1000, 0, 500]], intercept=0.0, slope=1.0, signed=True)
    assert read_ct(path).pixels[0, :3].tolist() == [-1000, 0, 500]
    path = write_ct_dicom(tmp_path / "t.dcm", [[0, 100, 1000]], intercept=-1000.0, slope=2.0)
    assert read_ct(path).pixels[0, :3].tolist() == [-1000, -800, 1000]


def test_dicom_padding_becomes_air(tmp_path):
    raw = np.array([[-32768, 0, 40]])  # signed storage, -32768 = outside the field of view
    with pytest.raises(CTIQAError, match=r"nopad\.dcm.*not plausible HU"):
        read_ct(write_ct_dicom(tmp_path / "nopad.dcm", raw, intercept=0.0, signed=True))
    path = write_ct_dicom(tmp_path / "pad.dcm", raw, intercept=0.0, signed=True)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00280120, "SS", -32768)  # Pixel Padding Value
    ds.save_as(path)
    assert read_ct(path).pixels[0, :3].tolist() == [-1024, 0, 40]


def test_dicom_flipped_axial_is_shown_in_standard_orientation(tmp_path):
    raw = np.array([[1, 2], [3, 4]]) + 1024
    normal = read_ct(write_ct_dicom(tmp_path / "n.dcm", raw))
    flipped = read_ct(write_ct_dicom(tmp_path / "f.dcm", raw, orientation=(1, 0, 0, 0, -1, 0)))
    assert top(normal.pixels, raw) == [[1, 2], [3, 4]]
    assert top(flipped.pixels, raw) == [[3, 4], [1, 2]]


def test_dicom_non_ct_and_garbage_are_refused(tmp_path):
    with pytest.raises(CTIQAError, match=r"mr\.dcm.*not a CT image"):
        read_ct(write_ct_dicom(tmp_path / "mr.dcm", [[1, 2]], intercept=None, modality="MR"))
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CTIQAError, match="junk.dcm"):
        read_ct(bad)
    with pytest.raises(CTIQAError, match="no such file"):
        read_ct(tmp_path / "missing.dcm")


def test_real_ct_small():
    img = read_ct(_testdata("CT_small.dcm"))
    assert img.kind == "hu" and img.shape == (128, 128)
    body = img.pixels[img.pixels > -500]
    assert -900 < img.pixels.min() < -800  # darkest voxels: lung/air inside the small field of view
    assert 0 <= np.median(body) <= 100  # soft tissue


@pytest.mark.parametrize("name", ["explicit_VR-UN.dcm", "bad_sequence.dcm"])  # JPEG 2000, JPEG lossless
def test_real_compressed_ct_has_sane_hu(name):
    img = read_ct(_testdata(name))
    assert img.kind == "hu" and img.shape == (512, 512)
    p = img.pixels
    assert (p < -900).mean() > 0.05 and -1030 <= np.percentile(p, 1) <= -950  # air ≈ -1000
    assert 0 <= np.median(p[p > -500]) <= 100  # soft tissue


def test_real_enhanced_multiframe_per_frame_rescale(tmp_path):
    path = _testdata("eCT_Supplemental.dcm")
    with pytest.raises(CTIQAError, match=r"eCT_Supplemental\.dcm.*2 frames"):
        read_ct(path)
    with pytest.raises(CTIQAError, match=r"eCT_Supplemental\.dcm.*frame 2 out of range"):
        read_ct(path, frame=2)
    frames = read_ct_frames(path)
    assert len(frames) == 2 and frames[1].source.endswith("#1")
    for f in frames:
        assert f.kind == "hu" and f.pixels.min() == -1024  # stored 0 + per-frame intercept -1024: air
        assert 0 <= np.median(f.pixels[f.pixels > -500]) <= 100
    np.testing.assert_array_equal(read_ct(path, frame=1).pixels, frames[1].pixels)
    # a per-frame intercept on frame 1 overrides the shared one (functional groups, DICOM PS3.3 C.7.6.16)
    ds = pydicom.dcmread(path)
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = -1000, 1, "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [pvt]
    ds.save_as(tmp_path / "e.dcm")
    f0, f1 = read_ct_frames(tmp_path / "e.dcm")
    assert f0.pixels.min() == -1024 and f1.pixels.min() == -1000


def test_dicom_series_order_and_errors(tmp_path):
    d = tmp_path / "series"
    d.mkdir()
    # file names and instance numbers disagree with the positions; positions decide
    for name, z, inst in [("a.dcm", 10.0, 1), ("b.dcm", -5.0, 2), ("c.dcm", 0.0, 3)]:
        write_ct_dicom(d / name, [[1024 + int(z)]], position=(0, 0, z), instance=inst)
    (d / "broken.dcm").write_bytes(b"DICM but not really")
    (d / ".DS_Store").write_bytes(b"x")
    with pytest.raises(CTIQAError, match="broken.dcm"):
        read_dicom_series(d)
    errors = []
    series = read_dicom_series(d, errors=errors)
    assert [n for n, _ in series] == ["b.dcm", "c.dcm", "a.dcm"]
    assert [img.pixels[0, 0] for _, img in series] == [-5, 0, 10]
    assert len(errors) == 1 and errors[0][0].endswith("broken.dcm") and "broken.dcm" in errors[0][1]
    # without positions: Instance Number
    e = tmp_path / "noipp"
    e.mkdir()
    for name, inst in [("x.dcm", 3), ("y.dcm", 1), ("z.dcm", 2)]:
        write_ct_dicom(e / name, [[1024]], position=None, instance=inst)
    assert [n for n, _ in read_dicom_series(e)] == ["y.dcm", "z.dcm", "x.dcm"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CTIQAError, match="empty: no readable DICOM"):
        read_dicom_series(empty)


# ---------------------------------------------------------------------------------------------- TIFF / PNG / JPEG


def test_ldctiqa_float_tiff_is_not_binarised(tmp_path):
    x = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    tifffile.imwrite(tmp_path / "0000.tif", x)
    img = read_ct(tmp_path / "0000.tif")
    assert img.kind == "unit"
    grey = np.asarray(render(img))[..., 0]
    assert len(np.unique(grey)) == 256  # every level survives: no clipping to 0/1
    # floor(255 x + 0.5): x = k/255 -> k
    assert grey.ravel().tolist() == list(range(256))


def test_float_tiff_hu_and_errors(tmp_path):
    hu = np.array([[-1000.0, 40.0], [215.0, 1500.0]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "hu.tif", tile(hu))
    img = read_ct(tmp_path / "hu.tif")
    assert img.kind == "hu"
    assert top(np.asarray(render(img))[..., 0], hu) == [[0, 128], [255, 255]]
    tifffile.imwrite(tmp_path / "nan.tif", np.array([[0.5, np.nan]], dtype=np.float32))
    with pytest.raises(CTIQAError, match=r"nan\.tif.*NaN"):
        read_ct(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "huge.tif", np.array([[-5000.0, 0.0]], dtype=np.float32))
    with pytest.raises(CTIQAError, match=r"huge\.tif.*plausible HU"):
        read_ct(tmp_path / "huge.tif")
    tifffile.imwrite(tmp_path / "rgbf.tif", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(CTIQAError, match=r"rgbf\.tif.*single-channel"):
        read_ct(tmp_path / "rgbf.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(CTIQAError, match=r"junk\.tif.*unreadable"):
        read_ct(tmp_path / "junk.tif")


def test_integer_tiffs(tmp_path):
    tifffile.imwrite(tmp_path / "i16.tif", tile(np.array([[-1024, 0, 40]], dtype=np.int16)))
    assert read_ct(tmp_path / "i16.tif").pixels[0, :3].tolist() == [-1024, 0, 40]
    # uint16 CT storage (12 bit, +1024 offset): HU = value - 1024
    tifffile.imwrite(tmp_path / "u16.tif", tile(np.array([[0, 1024, 1064, 4095]], dtype=np.uint16)))
    img = read_ct(tmp_path / "u16.tif")
    assert img.kind == "hu" and img.pixels[0, :4].tolist() == [-1024, 0, 40, 3071]
    tifffile.imwrite(tmp_path / "u16big.tif", np.array([[0, 60000]], dtype=np.uint16))
    with pytest.raises(CTIQAError, match=r"u16big\.tif.*uint16"):
        read_ct(tmp_path / "u16big.tif")
    tifffile.imwrite(tmp_path / "u8.tif", tile(np.array([[0, 128, 255]], dtype=np.uint8)))
    assert read_ct(tmp_path / "u8.tif").kind == "display"


def test_lzw_float_tiff_without_imagecodecs(tmp_path):
    # LZW needs imagecodecs in tifffile; PIL's libtiff decoder reads float32 ("F") exactly
    x = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    Image.fromarray(x, mode="F").save(tmp_path / "lzw.tif", compression="tiff_lzw")
    img = read_ct(tmp_path / "lzw.tif")
    assert img.kind == "unit"
    np.testing.assert_array_equal(img.pixels, x)


def test_tiff_axes(tmp_path):
    tifffile.imwrite(tmp_path / "q.tif", np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 16, 16))  # QYX
    assert read_ct(tmp_path / "q.tif").shape == (16, 16)
    tifffile.imwrite(tmp_path / "planar.tif", np.zeros((3, 8, 8), np.float32))  # tifffile writes planar RGB
    with pytest.raises(CTIQAError, match=r"planar\.tif.*3-channel float32"):
        read_ct(tmp_path / "planar.tif")
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = 200
    rgb[-1, -1] = 0
    tifffile.imwrite(tmp_path / "rgb8.tif", rgb, photometric="rgb")
    img = read_ct(tmp_path / "rgb8.tif")
    assert img.kind == "display" and img.pixels[0, 0] == pytest.approx(0.587 * 200)


def test_multipage_tiff_frames(tmp_path):
    stack = np.stack([np.full((16, 16), v, np.float32) for v in (0.0, 0.5, 1.0)])
    stack[:, -1, -1] = 0.25  # not constant
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")  # 3 pages, not planar RGB
    with pytest.raises(CTIQAError, match=r"stack\.tif.*3 images"):
        read_ct(tmp_path / "stack.tif")
    assert read_ct(tmp_path / "stack.tif", frame=1).pixels[0, 0] == 0.5
    assert [f.pixels[0, 0] for f in read_ct_frames(tmp_path / "stack.tif")] == [0.0, 0.5, 1.0]


def test_png_jpeg_display(tmp_path):
    Image.fromarray(tile(np.array([[0, 100, 255]], dtype=np.uint8))).save(tmp_path / "g.png")
    img = read_ct(tmp_path / "g.png")
    assert img.kind == "display" and img.pixels[0, :3].tolist() == [0, 100, 255]
    assert np.asarray(render(img))[0, :3].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]
    # RGB -> grey by BT.601 luminance: pure red 255 -> 0.299*255 = 76.2 -> 76
    Image.fromarray(tile(np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8))).save(tmp_path / "c.png")
    assert np.asarray(render(tmp_path / "c.png"))[0, :2, 0].tolist() == [76, 150]
    # 16-bit PNG keeps its values (not clipped to 8 bit): uint16 rule, HU = v - 1024
    Image.fromarray(tile(np.array([[0, 1024, 2000]], dtype=np.uint16))).save(tmp_path / "w.png")
    assert read_ct(tmp_path / "w.png").pixels[0, :3].tolist() == [-1024, 0, 976]
    Image.fromarray(np.tile(np.uint8([[88, 92]]), (16, 8))).save(tmp_path / "j.jpg", quality=95)
    j = read_ct(tmp_path / "j.jpg")
    assert j.kind == "display" and abs(float(j.pixels.mean()) - 90) < 2


def test_medgemma_needs_hu(tmp_path):
    unit = CTImage(np.array([[0.0, 1.0]]), "unit", "slice.tif")
    with pytest.raises(CTIQAError, match=r"slice\.tif.*unit_is_hu"):
        render(unit, "medgemma-3window")
    # HU = -135 + 350 x: x=0 -> -135 (R 110.7->111, G 0, B 0); x=1 -> 215 (R 154.3->154, G 255, B 255)
    rgb = np.asarray(render(unit, "medgemma-3window", unit_is_hu=True))
    assert rgb[0].tolist() == [[111, 0, 0], [154, 255, 255]]
    with pytest.raises(CTIQAError, match=r"shot\.png.*no Hounsfield"):
        render(CTImage(np.zeros((2, 2)), "display", "shot.png"), "medgemma-3window")
    with pytest.raises(CTIQAError, match="unknown encoding"):
        render(unit, "bone")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_render_writes_what_render_returns(tmp_path, capsys):
    path = write_ct_dicom(tmp_path / "a.dcm", np.array([[0, 1024], [1064, 1239]]))
    out = tmp_path / "out" / "a.png"
    assert main(["render", str(path), "--out", str(out), "--encoding", "medgemma-3window"]) == 0
    written = Image.open(out)
    assert written.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(written), np.asarray(render(path, "medgemma-3window")))
    assert "hu 16x16" in capsys.readouterr().out


def test_cli_render_frame_and_errors(tmp_path, capsys):
    x = tmp_path / "u.tif"
    tifffile.imwrite(x, np.linspace(0.4, 0.6, 256, dtype=np.float32).reshape(16, 16))
    out = tmp_path / "u.png"
    assert main(["render", str(x), "--out", str(out), "--encoding", "medgemma-3window"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "u.tif" in err and "\n" not in err
    assert main(["render", str(x), "--out", str(out), "--encoding", "medgemma-3window", "--unit-is-hu"]) == 0
    assert main(["render", _testdata("eCT_Supplemental.dcm"), "--out", str(out), "--frame", "1", "--overwrite"]) == 0
    assert Image.open(out).size == (512, 512)


def test_cli_render_keeps_an_existing_out_unless_overwrite_and_never_prints_the_input_name(tmp_path, capsys):
    """QA round 2 (D, J): `ctiqa render IN --out existing.png` replaced a PNG render did not write; its log line
    echoed the input path (a DICOM file is often named by its SOP Instance UID)."""
    uid_name = "1.2.840.113619.2.55.3.604688.dcm"
    path = write_ct_dicom(tmp_path / uid_name, np.array([[0, 1024], [1064, 1239]]))
    mine = tmp_path / "holiday.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(mine)
    before = mine.read_bytes()
    assert main(["render", str(path), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and mine.read_bytes() == before
    assert main(["render", str(path), "--out", str(mine), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert mine.read_bytes() != before and f"wrote {mine}" in printed and "hu 16x16" in printed
    assert "1.2.840" not in printed, printed


def test_cli_render_overwrite_onto_a_link_replaces_the_link_not_its_target(tmp_path, capsys):
    """QA round 3: `render --out LINK --overwrite` wrote the PNG through a symbolic link into the file it points to
    (the user's own image elsewhere). The link is replaced; the file it pointed to keeps its bytes; no temporary
    file is left, and a user's file named like the old temporary (`out.png.tmp`) is untouched."""
    path = write_ct_dicom(tmp_path / "a.dcm", np.array([[0, 1024], [1064, 1239]]))
    theirs = tmp_path / "keep" / "holiday.png"
    theirs.parent.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(theirs)
    before = theirs.read_bytes()
    link = tmp_path / "out.png"
    link.symlink_to(theirs)
    (tmp_path / "out.png.tmp").write_text("my notes")
    assert main(["render", str(path), "--out", str(link), "--overwrite"]) == 0
    assert theirs.read_bytes() == before
    assert not link.is_symlink() and Image.open(link).size == (16, 16)
    assert (tmp_path / "out.png.tmp").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm", "keep", "out.png", "out.png.tmp"]


def test_names_too_long_end_in_one_line(tmp_path, capsys):
    """QA round 3: a file name over the system's limit (255 bytes) ended in a traceback (OSError errno 36)."""
    long = "x" * 300
    path = write_ct_dicom(tmp_path / "a.dcm", np.array([[0, 1024], [1064, 1239]]))
    for argv in (["render", str(path), "--out", str(tmp_path / f"{long}.png")],
                 ["render", str(tmp_path / f"{long}.dcm"), "--out", str(tmp_path / "o.png")],
                 ["findings", str(path), "--out", str(tmp_path / f"{long}.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "too long" in err.lower(), err


def test_an_output_under_a_file_is_named_as_such(tmp_path, capsys):
    """QA round 4: `render --out notes.txt/x.png` said only "File exists"."""
    path = write_ct_dicom(tmp_path / "a.dcm", np.array([[0, 1024], [1064, 1239]]))
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["render", str(path), "--out", str(tmp_path / "notes.txt" / "x.png")]) == 2
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_full_disk_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """QA round 4: a full disk (ENOSPC, an OSError without a file name) ended every command in a traceback."""
    import errno

    import ctiqa.imaging as imaging

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = write_ct_dicom(tmp_path / "a.dcm", np.array([[0, 1024], [1064, 1239]]))
    monkeypatch.setattr(imaging, "render", full)
    assert main(["render", str(path), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device") and "\n" not in err


def test_dicom_folder_tells_series_apart(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    for name, z in [("a.dcm", 5.0), ("b.dcm", 0.0)]:
        write_ct_dicom(d / name, [[1024]], position=(0, 0, z), instance=1)
    ds = pydicom.dcmread(d / "a.dcm")
    ds.SeriesInstanceUID = "1.2.826.0.1.99"
    ds.save_as(d / "c.dcm")
    groups = read_dicom_folder(d)
    assert [[n for n, _ in g] for g in groups] == [["b.dcm", "a.dcm"], ["c.dcm"]]
    with pytest.raises(CTIQAError, match="holds 2 DICOM series"):
        read_dicom_series(d)


# ---------------------------------------------------------------------------------------------- bad inputs (issue 9)


def _without_rescale(src, dst, keep=()):
    ds = pydicom.dcmread(src)
    for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
        if kw in ds and kw not in keep:
            delattr(ds, kw)
    ds.save_as(dst)
    return dst


def test_ct_without_rescale_uses_the_ct_convention_and_warns(tmp_path):
    # CT_small.dcm: signed storage of HU + 1024 (intercept -1024 in the file). Without the tags, DICOM's identity
    # default would put air at 0 HU and render the slice ~92 % white.
    src = _testdata("CT_small.dcm")
    path = _without_rescale(src, tmp_path / "norescale.dcm")
    with pytest.warns(CTIQAWarning, match=r"norescale\.dcm: CT without Rescale Slope/Intercept.*-1024"):
        img = read_ct(path)
    assert img.kind == "hu" and len(img.notes) == 1 and "norescale.dcm" in img.notes[0]
    np.testing.assert_array_equal(img.pixels, read_ct(src).pixels)
    np.testing.assert_array_equal(np.asarray(render(img)), np.asarray(render(src)))
    assert (np.asarray(render(img))[..., 0] == 255).mean() < 0.5
    # an intercept without a slope: slope 1, read silently
    only_intercept = _without_rescale(src, tmp_path / "intercept.dcm", keep=("RescaleIntercept",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTIQAWarning)
        np.testing.assert_array_equal(read_ct(only_intercept).pixels, read_ct(src).pixels)


def test_ct_without_rescale_stored_as_hu_is_read_silently(tmp_path):
    src = _testdata("explicit_VR-UN.dcm")  # signed, intercept 0: HU stored directly, air at -1024
    path = _without_rescale(src, tmp_path / "hu.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTIQAWarning)
        img = read_ct(path)
    assert img.notes == []
    np.testing.assert_array_equal(img.pixels, read_ct(src).pixels)


def test_ct_without_rescale_that_fits_no_convention_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    liver = rng.normal(60, 5, (32, 32)).clip(30, 90)  # HU stored directly, unsigned: no air, no fat
    path = write_ct_dicom(tmp_path / "liver.dcm", liver, intercept=None)
    with pytest.raises(CTIQAError, match=r"liver\.dcm: CT without Rescale Slope/Intercept.*cannot tell"):
        read_ct(path)
    with_tag = read_ct(write_ct_dicom(tmp_path / "ok.dcm", liver, intercept=0.0))  # the same values, tagged
    assert with_tag.kind == "hu" and 30 <= with_tag.pixels.min() and with_tag.pixels.max() <= 90


def test_tiff_of_stored_ct_values_is_read_with_the_ct_offset_and_warns(tmp_path):
    """QA round 8: CT_small's stored values (HU + 1024, 128..2191) saved as an int16 or float32 TIFF were read as
    HU (air at +128 HU): the render 97 % white, scored 1.96 instead of 3.47, no warning. The uint16 TIFF and the
    DICOM-without-intercept rules already read them with -1024; now every HU TIFF follows that rule. HU stored
    directly (air negative) and a soft-tissue crop with no bone stay as they are, silently."""
    ref = read_ct(_testdata("CT_small.dcm"))
    stored = pydicom.dcmread(_testdata("CT_small.dcm")).pixel_array
    for dtype in (np.int16, np.float32):
        path = tmp_path / f"stored_{np.dtype(dtype).name}.tif"
        tifffile.imwrite(path, stored.astype(dtype))
        with pytest.warns(CTIQAWarning, match=r"no air or fat below 0 HU.*-1024"):
            img = read_ct(path)
        np.testing.assert_array_equal(np.asarray(render(img)), np.asarray(render(ref)))
    liver = np.random.default_rng(0).normal(60, 5, (32, 32)).clip(30, 90).astype(np.int16)
    for name, a in (("hu.tif", ref.pixels.astype(np.int16)), ("liver.tif", liver)):
        tifffile.imwrite(tmp_path / name, a)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CTIQAWarning)
            np.testing.assert_array_equal(read_ct(tmp_path / name).pixels, a)


def test_float_tiff_with_overshoot_is_clipped_and_counted(tmp_path):
    x = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    y = (1.2 * x - 0.1).astype(np.float32)  # a denoiser's output: -0.1..1.1
    tifffile.imwrite(tmp_path / "denoised.tif", y)
    expected = float(((y < 0) | (y > 1)).mean())  # 2 * 0.1/1.2 of a linear ramp, ~16.5 %
    with pytest.warns(CTIQAWarning, match=rf"denoised\.tif: .*overshoot.*{100 * expected:.1f} % of pixels clipped"):
        img = read_ct(tmp_path / "denoised.tif")
    assert img.kind == "unit" and img.pixels.min() == 0 and img.pixels.max() == 1
    np.testing.assert_array_equal(img.pixels, np.clip(y, 0, 1))
    grey = np.asarray(render(img))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 200  # not flat grey
    # data normalised to [-1, 1] is neither [0, 1] nor HU: refused, not rendered grey
    tifffile.imwrite(tmp_path / "pm1.tif", 2 * x - 1)
    with pytest.raises(CTIQAError, match=r"pm1\.tif: float values -1\.\.1 are not Hounsfield units"):
        read_ct(tmp_path / "pm1.tif")


def _excess_frames(tmp_path):
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.PixelData = ds.PixelData * 3  # three frames of pixels, Number of Frames absent (= 1)
    ds.save_as(tmp_path / "excess.dcm")
    return tmp_path / "excess.dcm"


def _one_pixel(tmp_path):
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.Rows = ds.Columns = 1
    ds.PixelData = ds.PixelData[:2]
    ds.save_as(tmp_path / "dot.dcm")
    return tmp_path / "dot.dcm"


def test_excess_frames_colour_and_tiny_dicom_are_one_line_errors(tmp_path):
    with pytest.raises(CTIQAError, match=r"excess\.dcm: pixel data holds 3 frames but Number of Frames says 1"):
        read_ct_frames(_excess_frames(tmp_path))
    # QA round 8: fewer frames than the header says: read_ct asked to choose a frame, and every frame then failed
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.NumberOfFrames = 3
    ds.save_as(tmp_path / "short.dcm")
    for read in (read_ct, read_ct_frames):
        with pytest.raises(CTIQAError, match=r"short\.dcm: pixel data holds 1 frame but Number of Frames says 3"):
            read(tmp_path / "short.dcm")
    for name in ("SC_rgb.dcm", "SC_rgb_2frame.dcm", "OBXXXX1A.dcm"):  # RGB secondary captures, palette colour
        with pytest.raises(CTIQAError, match=rf"{name}.*: colour DICOM"):
            read_ct_frames(_testdata(name))
    with pytest.raises(CTIQAError, match=r"liver\.dcm.*: 1-bit \(binary\) image, Modality SEG"):
        read_ct_frames(_testdata("liver.dcm"))  # a segmentation: its mask is not an image to grade
    with pytest.raises(CTIQAError, match=r"JPGLosslessP14SV1_1s_1f_8b\.dcm: not a CT image \(Modality US\)"):
        read_ct(_testdata("JPGLosslessP14SV1_1s_1f_8b.dcm"))  # 8-bit grey ultrasound
    with pytest.raises(CTIQAError, match=rf"dot\.dcm: image is 1x1 pixels; ctiqa needs at least {MIN_IMAGE_SIZE}"):
        read_ct(_one_pixel(tmp_path))
    tifffile.imwrite(tmp_path / "dot.tif", np.full((1, 1), 0.5, np.float32))
    with pytest.raises(CTIQAError, match=r"dot\.tif: image is 1x1 pixels"):
        read_ct(tmp_path / "dot.tif")


def test_a_batch_skips_bad_files_and_goes_on(tmp_path):
    """`ctiqa predict` over a folder: each bad file is one skipped row with its reason, the good slices are scored."""
    from ctiqa.predict import RowSink, gather_series, score_series

    d = tmp_path / "batch"
    d.mkdir()
    for z in (0.0, 5.0):
        write_ct_dicom(d / f"good{int(z)}.dcm", np.full((16, 16), 1064), position=(0, 0, z))
    _excess_frames(tmp_path).rename(d / "excess.dcm")
    _one_pixel(tmp_path).rename(d / "dot.dcm")
    (d / "rgb.dcm").write_bytes(Path(_testdata("SC_rgb.dcm")).read_bytes())
    errors = []
    groups = read_dicom_folder(d, errors=errors)
    assert [[n for n, _ in g] for g in groups] == [["good0.dcm", "good5.dcm"]]
    assert sorted(Path(p).name for p, _ in errors) == ["dot.dcm", "excess.dcm", "rgb.dcm"]
    assert all(Path(p).name in msg and "\n" not in msg for p, msg in errors)

    rows = []
    counts = score_series(gather_series([str(d)]), lambda images: [{"prob_score": 2.0} for _ in images],
                          RowSink(None, {}, False), encoding="soft-tissue", batch_size=4, on_row=rows.append)
    assert counts["scored"] == 2 and counts["skipped"] == 3
    reasons = sorted(r["skipped"] for r in rows if r.get("skipped"))
    assert [re.split("[:;]", r)[0] for r in reasons] == ["colour DICOM (RGB, 3 sample(s) per pixel, Modality OT)",
                                                 "image is 1x1 pixels", "pixel data holds 3 frames but Number of "
                                                 "Frames says 1"]


@pytest.mark.parametrize("image, match", [
    (Image.fromarray(np.full((32, 32), 3000, np.uint16)), "mode 'I;16'"),
    (Image.fromarray(np.full((32, 32), 0.5, np.float32)), "mode 'F'"),
    (Image.new("L", (32, 32), 90), "mode 'L'"),
    (Image.new("RGBA", (32, 32), (9, 9, 9, 0)), "mode 'RGBA'"),
    (Image.new("P", (32, 32)), "mode 'P'"),
    (Image.new("RGB", (8, 32)), "image is 8x32 pixels"),
    (np.zeros((32, 32, 3), np.uint8), "expected a PIL RGB image"),
])
def test_check_model_image_refuses_what_the_model_was_not_trained_on(image, match):
    with pytest.raises(CTIQAError, match=rf"slice 7: .*{re.escape(match)}"):
        check_model_image(image, "slice 7")
    ok = Image.new("RGB", (16, 16))
    assert check_model_image(ok) is ok


def test_inference_refuses_images_that_skipped_render():
    """A 16-bit image handed to the Python API is refused before the processor (PIL would clip it to 255)."""
    from types import SimpleNamespace

    from ctiqa.inference import generate_texts

    class Processor:
        def apply_chat_template(self, *a, **k):
            return "prompt"

        def __call__(self, *a, **k):
            raise AssertionError("reached the processor")

    lm = SimpleNamespace(processor=Processor())
    with pytest.raises(CTIQAError, match="mode 'I;16'"):
        generate_texts(lm, [Image.fromarray(np.full((32, 32), 3000, np.uint16))])
    with pytest.raises(AssertionError, match="reached the processor"):  # an RGB image goes through
        generate_texts(lm, [Image.new("RGB", (32, 32))])


def test_cli_render_prints_a_warning_line(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "o.tif", np.linspace(-0.1, 1.1, 256, dtype=np.float32).reshape(16, 16))
    assert main(["render", str(tmp_path / "o.tif"), "--out", str(tmp_path / "o.png")]) == 0
    cap = capsys.readouterr()
    assert cap.err.startswith("warning: ") and "o.tif" in cap.err and cap.err.count("\n") == 1
    assert "unit 16x16" in cap.out and "1 warning(s)" in cap.out


@pytest.mark.parametrize("photometric, expected", [("MONOCHROME2", [0, 100, 255]), ("MONOCHROME1", [255, 155, 0])])
def test_grey_secondary_capture_is_a_display_image(tmp_path, photometric, expected):
    path = write_ct_dicom(tmp_path / "sc.dcm", [[0, 100, 255]], intercept=None, modality="OT")
    ds = pydicom.dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = photometric  # MONOCHROME1: 0 is white
    ds.PixelData = tile(np.array([[0, 100, 255]], np.uint8)).tobytes()
    ds.save_as(path)
    img = read_ct(path)
    assert img.kind == "display" and img.pixels[0, :3].tolist() == expected


def test_predict_shows_reading_notes_without_the_file_name(tmp_path, capsys):
    """A CT without Rescale Intercept scored by `ctiqa predict`: the assumption is said, named like skipped inputs
    (series and slice; the file name, often a SOP Instance UID, only with --file-names)."""
    from ctiqa.predict import RowSink, gather_series, score_series

    path = _without_rescale(_testdata("CT_small.dcm"), tmp_path / "1.2.826.0.1.3680043.8.498.1.dcm")
    for file_names in (False, True):
        score_series(gather_series([str(path)], ids=["patientA"]), lambda images: [{"prob_score": 2.0}] * len(images),
                     RowSink(None, {}, file_names), encoding="soft-tissue", batch_size=1, file_names=file_names)
        err = capsys.readouterr().err
        assert "warning patientA slice 0: CT without Rescale Slope/Intercept" in err or file_names
        assert ("1.2.826.0.1.3680043" in err) == file_names


def test_cli_render_never_writes_over_its_input(tmp_path, capsys):
    """QA #18: `ctiqa render X.png --out X.png` replaced the user's image with its rendering. Refused (also through
    another spelling of the same path); the file's bytes are unchanged."""
    from ctiqa.cli import main

    x = tmp_path / "x.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(x)
    before = x.read_bytes()
    for out in (x, tmp_path / "." / "x.png"):
        assert main(["render", str(x), "--out", str(out)]) == 2
        assert "input" in capsys.readouterr().err
        assert x.read_bytes() == before


def test_blank_images_are_refused_not_scored(tmp_path, capsys):
    """QA #10/#11: an all-0 TIFF and a DICOM with Rescale Slope 0 (every value -1024) were rendered and scored with
    exit 0. Slope 0 is invalid DICOM; any image with no variation at all has nothing to assess."""
    write_ct_dicom(tmp_path / "slope0.dcm", np.arange(256).reshape(16, 16) + 900, slope=0.0)
    with pytest.raises(CTIQAError, match=r"slope0\.dcm: Rescale Slope is 0"):
        read_ct(tmp_path / "slope0.dcm")
    air = tile(np.full((1, 1), 0, np.uint16))  # stored 0 -> -1024 HU everywhere (write_ct_dicom would perturb it)
    write_ct_dicom(tmp_path / "air.dcm", np.arange(256).reshape(16, 16))
    ds = pydicom.dcmread(tmp_path / "air.dcm")
    ds.PixelData = air.astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "air.dcm")
    with pytest.raises(CTIQAError, match=r"air\.dcm: constant image .*nothing to assess"):
        read_ct(tmp_path / "air.dcm")
    tifffile.imwrite(tmp_path / "zero.tif", np.zeros((32, 32), np.float32))
    with pytest.raises(CTIQAError, match=r"zero\.tif: constant image \(every pixel 0\): nothing to assess"):
        read_ct(tmp_path / "zero.tif")
    with pytest.raises(CTIQAError, match="constant image"):
        read_ct_frames(tmp_path / "zero.tif")
    assert main(["render", str(tmp_path / "zero.tif"), "--out", str(tmp_path / "z.png")]) == 2
    assert not (tmp_path / "z.png").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "zero.tif: constant image" in err and "\n" not in err


def test_rgba_alpha_is_not_dropped_silently(tmp_path):
    """QA #14: the alpha of an RGBA PNG was dropped without a word; a transparent part is now a reading note."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = np.arange(256).reshape(16, 16, 1)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert read_ct(tmp_path / "opaque.png").notes == []  # nothing hidden: nothing to say
    rgba[:8, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    with pytest.warns(CTIQAWarning, match=r"half\.png: alpha channel ignored \(50\.0 %"):
        img = read_ct(tmp_path / "half.png")
    assert len(img.notes) == 1 and "alpha channel ignored" in img.notes[0]


def test_symlink_loop_is_named(tmp_path):
    """QA #16: a symlink loop was reported as "no such file"."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "nothing.dcm")
    with pytest.raises(CTIQAError, match=r"loop1: symlink loop"):
        read_ct(tmp_path / "loop1")
    with pytest.raises(CTIQAError, match=r"loop1: symlink loop"):
        read_ct_frames(tmp_path / "loop1")
    with pytest.raises(CTIQAError, match=r"dangling\.dcm: broken symlink"):
        read_ct(tmp_path / "dangling.dcm")
    with pytest.raises(CTIQAError, match=r"absent\.dcm: no such file"):
        read_ct(tmp_path / "absent.dcm")


def test_multipage_tiff_reads_every_page(tmp_path):
    """Pages appended one by one, or of different sizes, are each a slice (QA round 2: only series[0] was read)."""
    from ctiqa.imaging import read_ct_frames

    f = tmp_path / "appended.tif"
    ramp = np.linspace(-0.1, 0.1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for v in (0.2, 0.5, 0.8):
        tifffile.imwrite(f, ramp + v, append=True)
    frames = read_ct_frames(f)
    assert len(frames) == 3
    assert [round(float(fr.pixels.mean()), 3) for fr in frames] == [0.2, 0.5, 0.8]
    g = tmp_path / "sizes.tif"
    with tifffile.TiffWriter(g) as w:
        w.write(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) // 4)
        w.write(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) // 4)
    assert [fr.pixels.shape[:2] for fr in read_ct_frames(g)] == [(64, 64), (48, 64)]
    assert read_ct(g, frame=1).pixels.shape[:2] == (48, 64)


def test_a_one_bit_png_is_refused_as_the_same_mask_as_tiff_is(tmp_path):
    """QA round 12: a 1-bit PNG (a segmentation mask) was turned into 0/255 grey and scored as CT; the same pixels as
    TIFF were refused."""
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    Image.fromarray(mask).save(tmp_path / "mask.png")
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    for name in ("mask.png", "mask.tif"):
        with pytest.raises(CTIQAError, match=rf"{name}: 1-bit \(boolean\) image"):
            read_ct(tmp_path / name)
    # QA round 14: the same mask as a two-colour palette PNG (bit depth 1) was scored
    Image.fromarray(mask.astype(np.uint8)).convert("P").save(tmp_path / "palette.png", bits=1)
    with pytest.raises(CTIQAError, match=r"palette\.png: 1-bit \(two-colour\) image"):
        read_ct(tmp_path / "palette.png")

//! `data import-subjects200k`: tiny parquet shards written here with the published schema of
//! SubjectSpatial200K (image {bytes, path}, bbox list<double>, description struct,
//! quality_assessment struct, collection), imported into single-subject samples; bad shards
//! (a missing column, broken image bytes) are refused with the file and the reason.

use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DataType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::schema::parser::parse_message_type;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tokenar::data::subjects200k::{self, ImportOptions, Partition};
use tokenar::data::{Dataset, OpenOptions};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-s200k-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One row of a shard.
#[derive(Clone)]
struct TestRow {
    /// Encoded two-panel image (`None`: a null `image.bytes`).
    image: Option<Vec<u8>>,
    bbox: Option<Vec<f64>>,
    /// compositeStructure, objectConsistency, imageQuality.
    scores: [i64; 3],
    prompt: String,
}

/// Panel side and margin of the test images (the published ones: 512 and 8).
const PANEL: u32 = 40;
const MARGIN: u32 = 4;

fn scene_colour(i: usize) -> [u8; 3] {
    [20 + 30 * i as u8, 120, 60]
}

fn subject_colour(i: usize) -> [u8; 3] {
    [220, 10 + 25 * i as u8, 40]
}

/// A (2 * PANEL) x PANEL PNG: scene colour on the left, subject colour on the right, each panel
/// framed by a MARGIN-pixel grey border.
fn two_panel(i: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(2 * PANEL, PANEL, |x, y| {
        let px = x % PANEL;
        if px < MARGIN || px >= PANEL - MARGIN || y < MARGIN || y >= PANEL - MARGIN {
            image::Rgb([128, 128, 128])
        } else if x < PANEL {
            image::Rgb(scene_colour(i))
        } else {
            image::Rgb(subject_colour(i))
        }
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn row(i: usize, scores: [i64; 3]) -> TestRow {
    // A box over the middle half of the scene panel: cx 0.25, cy 0.5, w 0.25, h 0.5 of the
    // whole two-panel image.
    TestRow { image: Some(two_panel(i)), bbox: Some(vec![0.25, 0.5, 0.25, 0.5]), scores, prompt: format!("scene number {i}") }
}

fn write_leaf<T: DataType>(rg: &mut SerializedRowGroupWriter<'_, File>, values: &[T::T], def: &[i16], rep: Option<&[i16]>) {
    let mut col = rg.next_column().unwrap().expect("one more column");
    col.typed::<T>().write_batch(values, Some(def), rep).unwrap();
    col.close().unwrap();
}

/// Optional leaves inside an always-present optional group (definition level 2 when set).
fn strings(rg: &mut SerializedRowGroupWriter<'_, File>, v: &[Option<Vec<u8>>], depth: i16) {
    let values: Vec<ByteArray> = v.iter().flatten().map(|b| ByteArray::from(b.clone())).collect();
    let def: Vec<i16> = v.iter().map(|b| if b.is_some() { depth } else { depth - 1 }).collect();
    write_leaf::<ByteArrayType>(rg, &values, &def, None);
}

/// Write `rows` as a shard in row groups of `group` rows, with the columns `columns` (any of
/// image, bbox, description, quality_assessment, collection), in the layout the Hugging Face
/// `datasets` library writes (nullable struct fields, a three-level LIST), snappy-compressed.
fn write_shard(path: &Path, rows: &[TestRow], group: usize, columns: &[&str]) {
    let mut schema = String::from("message schema {\n");
    for c in columns {
        schema += match *c {
            "image" => "optional group image { optional binary bytes; optional binary path (STRING); }\n",
            "bbox" => "optional group bbox (LIST) { repeated group list { optional double element; } }\n",
            "description" => "optional group description { optional binary item (STRING); optional binary description_0 (STRING); optional binary description_1 (STRING); optional binary category (STRING); optional boolean description_valid; }\n",
            "quality_assessment" => "optional group quality_assessment { optional int64 compositeStructure; optional int64 objectConsistency; optional int64 imageQuality; }\n",
            "collection" => "optional binary collection (STRING);\n",
            other => panic!("unknown column {other}"),
        };
    }
    schema += "}\n";
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    for chunk in rows.chunks(group) {
        let mut rg = w.next_row_group().unwrap();
        for c in columns {
            match *c {
                "image" => {
                    strings(&mut rg, &chunk.iter().map(|r| r.image.clone()).collect::<Vec<_>>(), 2);
                    strings(&mut rg, &chunk.iter().map(|_| None).collect::<Vec<_>>(), 2);
                }
                "bbox" => {
                    let (mut values, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
                    for r in chunk {
                        match &r.bbox {
                            Some(b) => {
                                for (k, v) in b.iter().enumerate() {
                                    values.push(*v);
                                    def.push(3);
                                    rep.push(if k == 0 { 0 } else { 1 });
                                }
                            }
                            None => {
                                def.push(0);
                                rep.push(0);
                            }
                        }
                    }
                    write_leaf::<DoubleType>(&mut rg, &values, &def, Some(&rep));
                }
                "description" => {
                    let text = |f: &dyn Fn(&TestRow) -> String| chunk.iter().map(|r| Some(f(r).into_bytes())).collect::<Vec<_>>();
                    strings(&mut rg, &text(&|_| "a small thing".into()), 2);
                    strings(&mut rg, &text(&|r| r.prompt.clone()), 2);
                    strings(&mut rg, &text(&|_| "the thing in a studio".into()), 2);
                    strings(&mut rg, &text(&|_| "Things".into()), 2);
                    write_leaf::<BoolType>(&mut rg, &vec![true; chunk.len()], &vec![2; chunk.len()], None);
                }
                "quality_assessment" => {
                    for k in 0..3 {
                        let v: Vec<i64> = chunk.iter().map(|r| r.scores[k]).collect();
                        write_leaf::<Int64Type>(&mut rg, &v, &vec![2; chunk.len()], None);
                    }
                }
                "collection" => strings(&mut rg, &chunk.iter().map(|_| Some(b"collection_2".to_vec())).collect::<Vec<_>>(), 1),
                _ => unreachable!(),
            }
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

const ALL: [&str; 5] = ["image", "bbox", "description", "quality_assessment", "collection"];

/// Five rows in row groups of two: rows 0, 2 and 4 are in the evaluation partition (row 4 has
/// no box), row 1 is in the training partition, row 3 in neither.
fn five_rows() -> Vec<TestRow> {
    let mut rows = vec![row(0, [4, 5, 5]), row(1, [5, 5, 5]), row(2, [3, 5, 5]), row(3, [4, 4, 5]), row(4, [4, 5, 5])];
    rows[4].bbox = None;
    rows
}

fn opts(count: usize, size: u32) -> ImportOptions {
    ImportOptions { count, seed: 0, size, partition: Partition::Test, padding: 0, no_box: false }
}

fn pixel(img: &image::RgbImage, x: u32, y: u32) -> [u8; 3] {
    img.get_pixel(x, y).0
}

fn load(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

#[test]
fn imports_the_evaluation_partition_as_single_subject_samples() {
    let dir = tmp("import");
    let shard = dir.join("test-00000-of-00001.parquet");
    write_shard(&shard, &five_rows(), 2, &ALL);
    let out = dir.join("ds");
    let r = subjects200k::import(&[shard.clone()], &out, &opts(200, 40), false, None).unwrap();
    assert_eq!((r.rows, r.eligible, r.samples.len()), (5, 2, 2));
    assert_eq!(r.excluded.get("not in the partition"), Some(&2));
    assert_eq!(r.excluded.get("no usable bbox"), Some(&1));
    let rows: Vec<u64> = r.samples.iter().map(|s| s.row).collect();
    assert_eq!(rows, vec![0, 2]);

    let ds = Dataset::open(&out, &OpenOptions { decode: true, ..Default::default() }).unwrap();
    assert_eq!(ds.len(), 2, "{:?}", ds.skipped);
    for (k, (s, i)) in ds.samples.iter().zip([0usize, 2]).enumerate() {
        assert_eq!(s.id, format!("sample_{k}"));
        assert_eq!(s.prompt, format!("scene number {i}"));
        assert_eq!(s.refs.len(), 1);
        let target = load(s.target.as_ref().unwrap());
        let reference = load(&s.refs[0]);
        let background = load(&s.background);
        let mask = image::open(s.mask.as_ref().unwrap()).unwrap().to_luma8();
        assert_eq!(target.dimensions(), (40, 40));
        // The box [0.25, 0.5, 0.25, 0.5] of an 80x40 pair is x 10..30, y 10..30 of the scene.
        let meta = s.meta.as_ref().unwrap();
        assert_eq!(meta.subjects[0].bbox, Some([10, 10, 30, 30]));
        assert_eq!(meta.subjects[0].reference.as_deref(), Some("ref/0.png"));
        assert_eq!(pixel(&target, 20, 20), scene_colour(i));
        assert_eq!(pixel(&reference, 20, 20), subject_colour(i));
        assert_eq!(pixel(&background, 20, 20), [0, 0, 0]);
        assert_eq!(pixel(&background, 10, 10), [0, 0, 0]);
        assert_eq!(pixel(&background, 30, 20), scene_colour(i), "the box ends before x = 30");
        assert_eq!(pixel(&background, 6, 20), scene_colour(i));
        assert_eq!((mask.get_pixel(20, 20)[0], mask.get_pixel(9, 20)[0], mask.get_pixel(29, 29)[0]), (255, 0, 255));
        // Without --padding the panels keep their margins.
        assert_eq!(pixel(&target, 1, 1), [128, 128, 128]);
    }
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(info["generator"], subjects200k::GENERATOR);
    assert_eq!(info["shards"][0]["file"], "test-00000-of-00001.parquet");
    assert_eq!(info["shards"][0]["fingerprint"].as_str().unwrap().len(), 32);
    assert_eq!(info["samples"][1]["row"], 2);
    assert_eq!(info["samples"][1]["collection"], "collection_2");
    assert_eq!(info["samples"][1]["scores"], serde_json::json!([3, 5, 5]));
    // No temporary folder is left next to the output.
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_draw_is_seeded_and_spans_shards_and_row_groups() {
    let dir = tmp("draw");
    let (a, b) = (dir.join("a.parquet"), dir.join("b.parquet"));
    let rows: Vec<TestRow> = (0..6).map(|i| row(i, [4, 5, 5])).collect();
    write_shard(&a, &rows[..3], 2, &ALL);
    write_shard(&b, &rows[3..], 1, &ALL);
    let picks = |seed: u64| {
        let out = dir.join(format!("ds{seed}"));
        let o = ImportOptions { seed, ..opts(3, 16) };
        let r = subjects200k::import(&[a.clone(), b.clone()], &out, &o, false, None).unwrap();
        // Each written sample shows its own row's colours.
        for s in &r.samples {
            let i = s.shard * 3 + s.row as usize;
            let t = load(&out.join(&s.id).join("real.png"));
            assert_eq!(pixel(&t, 8, 8), scene_colour(i), "{}", s.id);
        }
        r.samples.iter().map(|s| (s.shard, s.row)).collect::<Vec<_>>()
    };
    let first = picks(1);
    let expected: Vec<(usize, u64)> =
        subjects200k::choose(6, 3, 1).into_iter().map(|i| (i / 3, (i % 3) as u64)).collect();
    assert_eq!(first, expected);
    assert_eq!(first.len(), 3);
    let others: Vec<_> = (2..6).map(picks).collect();
    assert!(others.iter().any(|p| *p != first), "different seeds draw different rows");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn padding_is_cut_and_no_box_masks_the_whole_scene() {
    let dir = tmp("pad");
    let shard = dir.join("s.parquet");
    write_shard(&shard, &[row(0, [4, 5, 5])], 4, &["image", "description", "quality_assessment"]);
    // Without a bbox column: refused unless --no-box.
    let e = subjects200k::import(&[shard.clone()], &dir.join("x"), &opts(1, 32), false, None).unwrap_err().to_string();
    assert!(e.contains("s.parquet") && e.contains("missing column `bbox`") && e.contains("--no-box"), "{e}");
    let out = dir.join("ds");
    let o = ImportOptions { padding: MARGIN, no_box: true, ..opts(1, 32) };
    subjects200k::import(&[shard], &out, &o, false, None).unwrap();
    let s = out.join("sample_0");
    let target = load(&s.join("real.png"));
    assert_eq!(pixel(&target, 0, 0), scene_colour(0), "the margin is cut");
    assert_eq!(pixel(&load(&s.join("ref/0.png")), 31, 31), subject_colour(0));
    let mask = image::open(s.join("mask.png")).unwrap().to_luma8();
    assert!(mask.pixels().all(|p| p[0] == 255));
    assert!(load(&s.join("background.png")).pixels().all(|p| p.0 == [0, 0, 0]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_shards_name_the_file_and_what_is_wrong() {
    let dir = tmp("bad");
    let out = dir.join("ds");
    // A shard of another dataset: no `image` column.
    let other = dir.join("other.parquet");
    write_shard(&other, &five_rows(), 2, &["bbox", "description", "quality_assessment"]);
    let e = subjects200k::import(&[other], &out, &opts(2, 16), false, None).unwrap_err().to_string();
    assert!(e.contains("other.parquet") && e.contains("missing column `image`") && e.contains("bbox, description"), "{e}");
    // No quality scores: only --partition all reads it.
    let noqa = dir.join("noqa.parquet");
    write_shard(&noqa, &five_rows(), 2, &["image", "bbox", "description"]);
    let e = subjects200k::import(&[noqa.clone()], &out, &opts(2, 16), false, None).unwrap_err().to_string();
    assert!(e.contains("noqa.parquet") && e.contains("missing column `quality_assessment`"), "{e}");
    let all = ImportOptions { partition: Partition::All, ..opts(9, 16) };
    assert_eq!(subjects200k::import(&[noqa], &out, &all, false, None).unwrap().samples.len(), 4);
    std::fs::remove_dir_all(&out).unwrap();
    // Broken image bytes in a chosen row.
    let broken = dir.join("broken.parquet");
    let mut rows = five_rows();
    rows[2].image = Some(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG".to_vec());
    write_shard(&broken, &rows, 2, &ALL);
    let e = subjects200k::import(&[broken], &out, &opts(2, 16), false, None).unwrap_err().to_string();
    assert!(e.contains("broken.parquet") && e.contains("row 2") && e.contains("image"), "{e}");
    assert!(!out.exists(), "nothing is left behind");
    // A file that is not parquet at all.
    let junk = dir.join("junk.parquet");
    std::fs::write(&junk, b"not parquet").unwrap();
    let e = subjects200k::import(&[junk], &out, &opts(2, 16), false, None).unwrap_err().to_string();
    assert!(e.contains("junk.parquet") && e.contains("parquet"), "{e}");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 4, "no temporary folder is left: {names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tokenar(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_command_line_imports_refuses_and_eval_reads_the_result() {
    let dir = tmp("cli");
    let shard = dir.join("shard.parquet");
    write_shard(&shard, &five_rows(), 2, &ALL);
    let out = dir.join("ds");
    let (s, o) = (shard.to_str().unwrap(), out.to_str().unwrap());
    let import = |extra: &[&str]| {
        let mut args = vec!["data", "import-subjects200k", s, "--out", o, "--size", "32"];
        args.extend_from_slice(extra);
        tokenar(&args)
    };
    let (code, text) = import(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("wrote 2 samples"), "{text}");
    // An earlier import is replaced only with --force; another folder never.
    let (code, text) = import(&[]);
    assert!(code == 2 && text.contains("--force"), "{code}: {text}");
    let (code, text) = import(&["--force", "--seed", "3", "--count", "1"]);
    assert_eq!(code, 0, "{text}");
    assert!(!out.join("sample_1").exists());
    let (code, text) = import(&["--force"]);
    assert_eq!(code, 0, "{text}");
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    let (code, text) = tokenar(&["data", "import-subjects200k", s, "--out", foreign.to_str().unwrap(), "--force"]);
    assert!(code == 2 && text.contains("not written by"), "{code}: {text}");
    assert!(foreign.join("notes.txt").exists());
    // A shard without the image column: exit status 2, the file and the column named.
    let bad = dir.join("bad.parquet");
    write_shard(&bad, &five_rows(), 2, &["bbox", "description", "quality_assessment"]);
    let (code, text) = tokenar(&["data", "import-subjects200k", bad.to_str().unwrap(), "--out", dir.join("x").to_str().unwrap()]);
    assert!(code == 2 && text.contains("bad.parquet") && text.contains("`image`"), "{code}: {text}");
    let (code, text) = import(&["--force", "--size", "0"]);
    assert!(code == 2 && text.contains("--size"), "{code}: {text}");

    // `data check` accepts the dataset, and `eval` scores predictions against it (the
    // backgrounds stand in for generated images).
    let (code, text) = tokenar(&["data", "check", o]);
    assert_eq!(code, 0, "{text}");
    let pred = dir.join("pred");
    std::fs::create_dir_all(&pred).unwrap();
    for k in 0..2 {
        std::fs::copy(out.join(format!("sample_{k}/background.png")), pred.join(format!("sample_{k}.png"))).unwrap();
    }
    let (code, text) = tokenar(&["eval", "--dataset", o, "--pred", pred.to_str().unwrap(), "--metrics", "pixel,background,subject,identity"]);
    assert_eq!(code, 0, "{text}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pred.join("eval/results.json")).unwrap()).unwrap();
    assert!(result.to_string().contains("psnr"), "{result}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Shards written by pyarrow itself (`tests/fixtures/subjects200k.py`), the writer of the
/// published ones: the layout read above is the one it writes, and a codec this build does not
/// decode is named before anything is read.
#[test]
fn shards_written_by_pyarrow_are_read_and_other_codecs_refused() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tmp("pyarrow");
    let out = dir.join("ds");
    let r = subjects200k::import(&[fixtures.join("subjects200k-pyarrow.parquet")], &out, &opts(200, 16), false, None).unwrap();
    assert_eq!((r.rows, r.eligible), (3, 2));
    assert_eq!(r.samples.iter().map(|s| s.row).collect::<Vec<_>>(), vec![0, 2]);
    for (s, i) in r.samples.iter().zip([0u8, 2]) {
        let d = out.join(&s.id);
        assert_eq!(std::fs::read_to_string(d.join("description.txt")).unwrap(), format!("scene {i}"));
        assert_eq!(pixel(&load(&d.join("real.png")), 1, 1), [40 * i, 100, 60]);
        assert_eq!(pixel(&load(&d.join("ref/0.png")), 1, 1), [200, 30 * i, 20]);
        // [0.25, 0.5, 0.25, 0.5] of a 32x16 pair: x 4..12, y 4..12 of the 16-pixel scene.
        assert_eq!(s.pixel_box, [4, 4, 12, 12]);
        assert_eq!(pixel(&load(&d.join("background.png")), 4, 4), [0, 0, 0]);
        assert_eq!(pixel(&load(&d.join("background.png")), 12, 12), [40 * i, 100, 60]);
    }
    let zstd = fixtures.join("subjects200k-zstd.parquet");
    let e = subjects200k::import(&[zstd], &dir.join("z"), &opts(200, 16), false, None).unwrap_err().to_string();
    assert!(e.contains("subjects200k-zstd.parquet") && e.contains("ZSTD") && e.contains("snappy"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

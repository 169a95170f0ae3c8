//! The built-in file-level diff, used when diffoscope is absent, fails or times out on a pair:
//! a unified diff (capped) when both versions are UTF-8 text, else the first differing byte
//! offset and a short hex view of both sides around it. Pure functions of the two byte strings.

/// Text larger than this is shown as binary (its first difference), not diffed line by line.
const TEXT_LIMIT: usize = 1 << 20;
/// The most a unified diff of one pair contributes to the report.
pub const DIFF_CAP: usize = 64 << 10;
/// Past this, the line diff settles for a coarser (still correct) answer: two large, wholly
/// different texts would otherwise cost minutes of the controller's CPU.
const DIFF_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes per line of the hex view, and lines shown around the first difference.
const HEX_WIDTH: usize = 16;
const HEX_LINES: usize = 3;

/// Explains how `b` (group `lb`) differs from `a` (group `la`), both versions of `path`.
pub fn explain(path: &str, la: &str, a: &[u8], lb: &str, b: &[u8]) -> String {
    match (text(a), text(b)) {
        (Some(ta), Some(tb)) => unified(path, la, ta, lb, tb),
        _ => binary(la, a, lb, b),
    }
}

fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > TEXT_LIMIT || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

fn unified(path: &str, la: &str, a: &str, lb: &str, b: &str) -> String {
    let diff = similar::TextDiff::configure()
        .timeout(DIFF_TIME)
        .diff_lines(a, b);
    let mut out = diff
        .unified_diff()
        .context_radius(3)
        .header(&format!("{la}/{path}"), &format!("{lb}/{path}"))
        .to_string();
    if out.len() > DIFF_CAP {
        let mut end = DIFF_CAP;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str(&format!("\n[diff truncated at {DIFF_CAP} bytes]\n"));
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn binary(la: &str, a: &[u8], lb: &str, b: &[u8]) -> String {
    let offset = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let mut out = format!("binary: first difference at byte offset {offset} (0x{offset:x})");
    if offset == a.len().min(b.len()) {
        let shorter = if a.len() < b.len() { la } else { lb };
        out.push_str(&format!(
            "; {shorter} ends there, the other goes on ({} and {} bytes)",
            a.len(),
            b.len()
        ));
    }
    out.push('\n');
    let start = (offset - offset % HEX_WIDTH).saturating_sub(HEX_WIDTH);
    for (label, bytes) in [(la, a), (lb, b)] {
        for line in 0..HEX_LINES {
            let at = start + line * HEX_WIDTH;
            if at >= bytes.len() {
                break;
            }
            let chunk = &bytes[at..(at + HEX_WIDTH).min(bytes.len())];
            out.push_str(&hex_line(label, at, chunk));
        }
    }
    out
}

/// `A 00000020: 6865 6c6c 6f0a ...  hello.` (xxd's layout, prefixed by the group).
fn hex_line(label: &str, at: usize, chunk: &[u8]) -> String {
    let mut hex = String::new();
    for (i, byte) in chunk.iter().enumerate() {
        if i > 0 && i % 2 == 0 {
            hex.push(' ');
        }
        hex.push_str(&format!("{byte:02x}"));
    }
    let ascii: String = chunk
        .iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        })
        .collect();
    format!("{label} {at:08x}: {hex:<39}  {ascii}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_gets_a_unified_diff() {
        let out = explain(
            "out.txt",
            "A",
            b"one\ntwo\nthree\n",
            "B",
            b"one\nTWO\nthree\n",
        );
        assert!(out.starts_with("--- A/out.txt\n+++ B/out.txt\n"), "{out}");
        assert!(out.contains("-two\n+TWO\n"), "{out}");
    }

    #[test]
    fn binary_shows_the_first_differing_offset_on_both_sides() {
        let a: Vec<u8> = (0..64).collect();
        let mut b = a.clone();
        b[40] = 0xff;
        let out = explain("lib.so", "A", &a, "B", &b);
        assert!(out.contains("offset 40 (0x28)"), "{out}");
        assert!(
            out.contains("A 00000020: 2021 2223 2425 2627 2829"),
            "{out}"
        );
        assert!(
            out.contains("B 00000020: 2021 2223 2425 2627 ff29"),
            "{out}"
        );
    }

    #[test]
    fn a_prefix_says_which_side_is_shorter() {
        let out = explain("x", "A", b"\0abc", "B", b"\0abcdef");
        assert!(out.contains("offset 4"), "{out}");
        assert!(out.contains("A ends there"), "{out}");
    }

    #[test]
    fn a_huge_text_diff_is_capped() {
        let a: String = (0..2000)
            .map(|i| format!("line {i} of a text long enough\n"))
            .collect();
        let b: String = (0..2000)
            .map(|i| format!("LINE {i} of a text long enough\n"))
            .collect();
        let out = explain("big.txt", "A", a.as_bytes(), "B", b.as_bytes());
        assert!(out.len() < DIFF_CAP + 100, "{}", out.len());
        assert!(out.contains("[diff truncated at"));
    }
}

//! Secret redaction for build logs, shared by the worker (before it ships a log) and the
//! controller (again, since it does not trust the worker). Logs arrive in chunks, so a secret
//! may be split between two of them: [`Redactor::redact`] redacts what it can decide and hands
//! back the tail that could still be the start of a secret, which the caller keeps and puts in
//! front of the next chunk. Offsets are counted in the redacted stream, so a reader resuming at
//! an offset never sees a secret's bytes.
//!
//! Two kinds of secret: literal strings (the tokens a party holds for the job, an operator's
//! list) and, when asked, anything shaped like a JWT or JWS (a run of base64url characters and
//! dots that starts with `eyJ` and has at least three dot-separated parts). This stops accidental and casual leaks; a build that wants to leak
//! a token can always encode it first, which is why tokens are short-lived and revoked.

/// What a secret is replaced with.
pub const REDACTED: &[u8] = b"[redacted]";

/// A run of JWT characters longer than this is not held back waiting for its end: it is
/// decided as it stands (no real token is this long), so the held tail stays bounded.
pub const MAX_HELD_RUN: usize = 64 * 1024;

/// Literal secrets shorter than this are ignored: redacting every `a` would destroy the log and
/// protect nothing.
pub const MIN_LITERAL: usize = 8;

/// Finds and replaces secrets in a log stream.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is redacted whole.
    literals: Vec<Vec<u8>>,
    jwt: bool,
}

impl std::fmt::Debug for Redactor {
    // Never print the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("literals", &self.literals.len())
            .field("jwt", &self.jwt)
            .finish()
    }
}

impl Redactor {
    /// A redactor for `literals` (those shorter than [`MIN_LITERAL`] bytes are skipped) and, if
    /// `jwt`, anything shaped like a JWT.
    pub fn new<I, S>(literals: I, jwt: bool) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut literals: Vec<Vec<u8>> = literals
            .into_iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| s.len() >= MIN_LITERAL)
            .collect();
        literals.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        literals.dedup();
        Redactor { literals, jwt }
    }

    /// Whether this redactor can find anything at all.
    pub fn is_empty(&self) -> bool {
        self.literals.is_empty() && !self.jwt
    }

    /// Redacts `input`, the held tail of the previous call followed by new bytes. Returns the
    /// redacted output and how many bytes of `input` it covers; the rest (`input[consumed..]`)
    /// may be the start of a secret and must be passed in again, in front of the next chunk.
    /// With `end` (no more input will come) everything is consumed.
    pub fn redact(&self, input: &[u8], end: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(input.len());
        let mut i = 0;
        'scan: while i < input.len() {
            let rest = &input[i..];
            for lit in &self.literals {
                if rest.starts_with(lit) {
                    out.extend_from_slice(REDACTED);
                    i += lit.len();
                    continue 'scan;
                }
            }
            if self.literals.iter().any(|lit| lit.starts_with(rest)) {
                if !end {
                    break; // perhaps a literal split by the chunk boundary
                }
                if rest.len() >= MIN_LITERAL / 2 {
                    // The log ends in the start of a secret: do not leave half of it.
                    out.extend_from_slice(REDACTED);
                    i = input.len();
                    continue;
                }
            }
            // A JWT starts a run of its characters, so each run is looked at once and a
            // hostile log cannot make this quadratic (`eyJeyJeyJ...`). The start of the input
            // counts as a run's start: it is where an undecided run was held back.
            let run_start = i == 0 || !(jwt_char(input[i - 1]) || input[i - 1] == b'.');
            if self.jwt && run_start {
                match jwt_at(rest, end) {
                    Jwt::No => {}
                    Jwt::Undecided => break,
                    Jwt::Yes(len) => {
                        out.extend_from_slice(REDACTED);
                        i += len;
                        continue 'scan;
                    }
                }
            }
            out.push(input[i]);
            i += 1;
        }
        (out, i)
    }

    /// Redacts a whole text at once.
    pub fn redact_all(&self, input: &[u8]) -> Vec<u8> {
        self.redact(input, true).0
    }
}

enum Jwt {
    No,
    /// The input ends inside what may still become a JWT.
    Undecided,
    Yes(usize),
}

fn jwt_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Whether `rest` starts with a JWT-shaped run: `eyJ`, then base64url characters and dots,
/// with at least three dot-separated segments, the first two non-empty.
fn jwt_at(rest: &[u8], end: bool) -> Jwt {
    const START: &[u8] = b"eyJ";
    if rest.len() < START.len() {
        return if !end && START.starts_with(rest) {
            Jwt::Undecided
        } else {
            Jwt::No
        };
    }
    if !rest.starts_with(START) {
        return Jwt::No;
    }
    let scan = &rest[..rest.len().min(MAX_HELD_RUN + 1)];
    let run = scan
        .iter()
        .position(|&b| !(jwt_char(b) || b == b'.'))
        .unwrap_or(scan.len());
    if run == rest.len() && !end && run <= MAX_HELD_RUN {
        return Jwt::Undecided;
    }
    let run = &rest[..run.min(MAX_HELD_RUN)];
    // Trailing dots end a sentence, not a token.
    let len = run.len() - run.iter().rev().take_while(|&&b| b == b'.').count();
    let mut segments = run[..len].split(|&b| b == b'.');
    let first_two_filled = segments.by_ref().take(2).all(|s| !s.is_empty());
    if first_two_filled && segments.next().is_some() {
        Jwt::Yes(len)
    } else {
        Jwt::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ3In0.c2lnbmF0dXJl";

    /// Feeds `chunks` through the redactor as a stream, keeping the tail as a caller would.
    fn stream(r: &Redactor, chunks: &[&[u8]]) -> Vec<u8> {
        let mut tail = Vec::new();
        let mut out = Vec::new();
        for c in chunks {
            tail.extend_from_slice(c);
            let (o, n) = r.redact(&tail, false);
            out.extend_from_slice(&o);
            tail.drain(..n);
        }
        out.extend_from_slice(&r.redact_all(&tail));
        out
    }

    #[test]
    fn literals_are_redacted_wherever_they_are() {
        let r = Redactor::new(["s3cret-token", "short"], false);
        assert_eq!(
            r.redact_all(b"a s3cret-token b s3cret-tokens3cret-token short"),
            b"a [redacted] b [redacted][redacted] short"
        );
    }

    #[test]
    fn a_literal_split_at_every_possible_place_is_still_redacted() {
        let r = Redactor::new(["s3cret-token"], false);
        let text = b"before s3cret-token after";
        for cut in 0..=text.len() {
            let out = stream(&r, &[&text[..cut], &text[cut..]]);
            assert_eq!(out, b"before [redacted] after", "cut at {cut}");
        }
        // One byte at a time too.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(stream(&r, &bytes), b"before [redacted] after");
    }

    #[test]
    fn a_log_ending_in_the_start_of_a_secret_does_not_show_it() {
        let r = Redactor::new(["s3cret-token"], false);
        assert_eq!(r.redact_all(b"x s3cret-to"), b"x [redacted]");
        assert_eq!(r.redact_all(b"x s3"), b"x s3", "too short to say");
    }

    #[test]
    fn the_longest_literal_wins() {
        let r = Redactor::new(["abcdefgh", "abcdefghijkl"], false);
        assert_eq!(r.redact_all(b"xabcdefghijkly"), b"x[redacted]y");
    }

    #[test]
    fn jwt_shapes_are_redacted_and_other_dotted_words_are_not() {
        let r = Redactor::new::<_, &str>([], true);
        let text = format!("token={JWT}. version 1.2.3 eyJ.not eyJabc.def and eyJonly");
        assert_eq!(
            String::from_utf8(r.redact_all(text.as_bytes())).unwrap(),
            "token=[redacted]. version 1.2.3 eyJ.not eyJabc.def and eyJonly"
        );
    }

    #[test]
    fn a_jwt_split_across_chunks_is_redacted() {
        let r = Redactor::new::<_, &str>([], true);
        let text = format!("Authorization: Bearer {JWT}\nnext line\n");
        for cut in 0..=text.len() {
            let out = stream(&r, &[&text.as_bytes()[..cut], &text.as_bytes()[cut..]]);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "Authorization: Bearer [redacted]\nnext line\n",
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn the_held_tail_is_only_what_may_start_a_secret() {
        let r = Redactor::new(["s3cret-token"], true);
        let (out, n) = r.redact(b"plain text s3cr", false);
        assert_eq!((out.as_slice(), n), (&b"plain text "[..], 11));
        let (_, n) = r.redact(b"plain text", false);
        assert_eq!(n, 10, "nothing held when no secret can start here");
        let (_, n) = r.redact(b"x ey", false);
        assert_eq!(n, 2, "`ey` may begin a JWT");
    }

    #[test]
    fn a_hostile_run_of_token_starts_is_passed_through() {
        // Looking at every `eyJ` to the end of its run would be quadratic here and not finish.
        let r = Redactor::new(["s3cret-token"], true);
        let text = "eyJ".repeat(1 << 20);
        let (out, n) = r.redact(text.as_bytes(), false);
        assert_eq!((out.len(), n), (text.len(), text.len()));
    }

    #[test]
    fn a_jwt_inside_a_longer_word_is_left_alone() {
        let r = Redactor::new::<_, &str>([], true);
        let text = format!("x{JWT} ({JWT})");
        assert_eq!(
            String::from_utf8(r.redact_all(text.as_bytes())).unwrap(),
            format!("x{JWT} ([redacted])")
        );
    }

    #[test]
    fn an_endless_run_is_decided_once_it_is_too_long_to_be_a_token() {
        let r = Redactor::new::<_, &str>([], true);
        let run = format!("eyJ{}", "A".repeat(MAX_HELD_RUN + 10));
        let (out, n) = r.redact(run.as_bytes(), false);
        assert!(
            n > 0 && out.len() == n,
            "an over-long run is passed through, not held"
        );
    }
}

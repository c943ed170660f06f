//! Incremental detokenization with stop strings: turns the token stream of a
//! sequence into text deltas that never split a UTF-8 character and never
//! leak a stop string (or the start of one that may still complete).

use crate::model::{Result, TextTokenizer};

/// Anything that turns token ids into text.
pub trait Detokenize {
    fn detokenize(&self, ids: &[u32]) -> Result<String>;
}

impl Detokenize for TextTokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.decode(ids)
    }
}

/// Text state of one sequence.
#[derive(Debug, Default)]
pub struct OutputText {
    stops: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
}

/// Result of pushing a token.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// Text safe to send now.
    pub text: String,
    /// A stop string was produced (the text before it is in `text`).
    pub stopped: bool,
}

impl OutputText {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, ..Default::default() }
    }

    /// Seeds already-sent tokens (request migration): their text counts as sent.
    pub fn prime(&mut self, tok: &impl Detokenize, ids: &[u32]) -> Result<()> {
        self.tokens.extend_from_slice(ids);
        self.text = tok.detokenize(&self.tokens)?;
        self.sent = self.text.len();
        Ok(())
    }

    /// Adds a generated token and returns what may be sent.
    pub fn push(&mut self, tok: &impl Detokenize, id: u32) -> Result<Delta> {
        self.tokens.push(id);
        let full = tok.detokenize(&self.tokens)?;
        if full.ends_with('\u{FFFD}') {
            // An incomplete multi-byte character: wait for the next token.
            return Ok(Delta::default());
        }
        self.text = full;
        Ok(self.advance())
    }

    /// Everything not yet sent (at the end of the sequence).
    pub fn flush(&mut self) -> String {
        let start = self.sent.min(self.text.len());
        self.sent = self.text.len();
        self.text.get(start..).unwrap_or_default().to_string()
    }

    fn advance(&mut self) -> Delta {
        let pending = &self.text[self.sent..];
        // Earliest complete stop string, searched from a little before the
        // unsent part so a stop spanning two deltas is found.
        let from = floor_char(&self.text, self.sent.saturating_sub(self.max_stop()));
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p)).min();
        if let Some(p) = hit {
            let out = self.text[self.sent..p.max(self.sent)].to_string();
            self.sent = self.text.len();
            return Delta { text: out, stopped: true };
        }
        // Hold back the longest suffix that starts a stop string.
        let mut hold = 0;
        for s in &self.stops {
            for l in (1..s.len().min(pending.len() + 1)).rev() {
                if pending.is_char_boundary(pending.len() - l)
                    && s.as_bytes().starts_with(&pending.as_bytes()[pending.len() - l..])
                {
                    hold = hold.max(l);
                    break;
                }
            }
        }
        let end = self.text.len() - hold;
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        Delta { text: out, stopped: false }
    }

    fn max_stop(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token i is the i-th string; the byte-level "é" is split over ids 3, 4.
    struct Table;
    impl Detokenize for Table {
        fn detokenize(&self, ids: &[u32]) -> Result<String> {
            let mut bytes = Vec::new();
            for &i in ids {
                let piece: &[u8] = match i {
                    0 => b"Hello",
                    1 => b" wor",
                    2 => b"ld",
                    3 => &[0xC3],
                    4 => &[0xA9],
                    5 => b"\n\nUser:",
                    _ => b"!",
                };
                bytes.extend_from_slice(piece);
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn run(stops: &[&str], ids: &[u32]) -> (Vec<String>, bool, String) {
        let mut o = OutputText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for &i in ids {
            let d = o.push(&Table, i).unwrap();
            deltas.push(d.text);
            if d.stopped {
                return (deltas, true, o.flush());
            }
        }
        (deltas, false, o.flush())
    }

    #[test]
    fn plain_text_streams_token_by_token() {
        let (d, stopped, rest) = run(&[], &[0, 1, 2]);
        assert_eq!(d, vec!["Hello", " wor", "ld"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let (d, _, _) = run(&[], &[0, 3, 4]);
        assert_eq!(d, vec!["Hello", "", "\u{e9}"]);
    }

    #[test]
    fn stop_strings_spanning_tokens_are_cut_and_never_leaked() {
        let (d, stopped, _) = run(&["world"], &[0, 1, 2, 6]);
        assert!(stopped);
        assert_eq!(d.concat(), "Hello ");
        assert_eq!(d[1], " ", "the start of a possible stop (\"wor\") is held back");
        let (d, stopped, rest) = run(&["\n\nUser"], &[0, 5, 6]);
        assert!(stopped);
        assert_eq!(d.concat() + &rest, "Hello");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_complete() {
        let (d, stopped, rest) = run(&["worry"], &[0, 1, 2]);
        assert!(!stopped);
        assert_eq!(d.concat() + &rest, "Hello world");
    }
}

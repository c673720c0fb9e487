//! The word-level vocabulary of the built-in text encoder: lower-cased words (maximal runs of
//! letters, digits and apostrophes), a fixed list built from a corpus of prompts, `<pad>` = 0,
//! `<unk>` = 1. It is stored as JSON in the checkpoint metadata.

use crate::error::{Error, Result};
use std::collections::HashMap;

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
pub const PAD_ID: u32 = 0;
pub const UNK_ID: u32 = 1;

#[derive(Clone, Debug, PartialEq)]
pub struct WordVocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
}

/// Split a prompt into lower-cased words; punctuation separates words and is dropped.
pub fn split_words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

impl WordVocab {
    /// Build from a corpus: every word seen at least `min_count` times, most frequent first
    /// (ties in alphabetical order, so the list is deterministic), at most `max_words` words
    /// besides `<pad>` and `<unk>`.
    pub fn build<S: AsRef<str>>(corpus: &[S], min_count: usize, max_words: usize) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for p in corpus {
            for w in split_words(p.as_ref()) {
                *counts.entry(w).or_default() += 1;
            }
        }
        let mut list: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|(w, c)| *c >= min_count.max(1) && w != PAD && w != UNK)
            .collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        list.truncate(max_words);
        let words = [PAD.to_string(), UNK.to_string()]
            .into_iter()
            .chain(list.into_iter().map(|(w, _)| w))
            .collect();
        Self::from_words(words).unwrap_or_else(|_| unreachable!("built lists start with <pad>, <unk>"))
    }

    /// From a full word list, which must start with `<pad>`, `<unk>` and hold no duplicates.
    pub fn from_words(words: Vec<String>) -> Result<Self> {
        if words.len() < 2 || words[0] != PAD || words[1] != UNK {
            return Err(Error::invalid("vocabulary", "the word list must start with \"<pad>\", \"<unk>\""));
        }
        let mut index = HashMap::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if index.insert(w.clone(), i as u32).is_some() {
                return Err(Error::invalid("vocabulary", format!("word {w:?} appears twice")));
            }
        }
        Ok(Self { words, index })
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    pub fn id(&self, word: &str) -> u32 {
        self.index.get(word).copied().unwrap_or(UNK_ID)
    }

    /// Token ids of a prompt (no padding), truncated to `max_len`.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        split_words(text).iter().take(max_len).map(|w| self.id(w)).collect()
    }

    /// The JSON stored in checkpoint metadata: the word list.
    pub fn to_json(&self) -> String {
        serde_json::Value::from(self.words.clone()).to_string()
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let words: Vec<String> = serde_json::from_str(text)
            .map_err(|e| Error::invalid("vocabulary", format!("expected a JSON list of words: {e}")))?;
        Self::from_words(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_encode_and_roundtrip() {
        let corpus = ["A dog on the LEFT of a cat.", "a cat, beside a mug", "dog's toy"];
        let v = WordVocab::build(&corpus, 1, 100);
        assert_eq!(&v.words()[..3], &["<pad>", "<unk>", "a"]);
        assert_eq!(v.encode("A Cat, a zebra!", 10), vec![v.id("a"), v.id("cat"), v.id("a"), UNK_ID]);
        assert_eq!(v.encode("a a a a", 2).len(), 2);
        assert!(v.words().contains(&"dog's".to_string()));
        let back = WordVocab::from_json(&v.to_json()).unwrap();
        assert_eq!(back, v);
        let small = WordVocab::build(&corpus, 2, 100);
        assert_eq!(small.words(), &["<pad>", "<unk>", "a", "cat"]);
        assert_eq!(WordVocab::build(&corpus, 1, 1).len(), 3);
        assert!(WordVocab::from_json("[\"x\"]").is_err());
        assert!(WordVocab::from_json("{").is_err());
        assert!(WordVocab::from_words(vec![PAD.into(), UNK.into(), "a".into(), "a".into()]).is_err());
    }
}

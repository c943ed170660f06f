//! Evaluation data: loaders for the multiple-choice sets, the key–value
//! retrieval set and the perplexity text in `shared/data`, each turned into
//! the prompt format of the QAQ paper's protocol (qaq-algorithm.md §8.2),
//! and the seeded item sample.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

/// A multiple-choice item: each choice is `contexts[ctx_of[c]]` followed by
/// `continuations[c]`. Most tasks share one context; Winogrande varies the
/// context and shares the continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct McItem {
    /// Stable id within the task (the line number in its file).
    pub id: usize,
    pub contexts: Vec<String>,
    /// For each choice, the index of its context.
    pub ctx_of: Vec<usize>,
    pub continuations: Vec<String>,
    pub label: usize,
}

impl McItem {
    fn shared(id: usize, context: String, choices: Vec<String>, label: usize) -> Self {
        let n = choices.len();
        let continuations = choices.into_iter().map(|c| format!(" {}", c.trim())).collect();
        Self { id, contexts: vec![context], ctx_of: vec![0; n], continuations, label }
    }
}

/// The multiple-choice tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum McTask {
    HellaSwag,
    Piqa,
    ArcEasy,
    ArcChallenge,
    Winogrande,
    MathQa,
}

impl McTask {
    pub const ALL: [McTask; 6] =
        [McTask::HellaSwag, McTask::Piqa, McTask::ArcEasy, McTask::ArcChallenge, McTask::Winogrande, McTask::MathQa];

    pub fn name(self) -> &'static str {
        match self {
            McTask::HellaSwag => "hellaswag",
            McTask::Piqa => "piqa",
            McTask::ArcEasy => "arc_easy",
            McTask::ArcChallenge => "arc_challenge",
            McTask::Winogrande => "winogrande",
            McTask::MathQa => "mathqa",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    fn file(self) -> &'static str {
        match self {
            McTask::HellaSwag => "hellaswag/hellaswag_val.jsonl",
            McTask::Piqa => "piqa/piqa_dev.jsonl",
            McTask::ArcEasy => "extra_mc/arc_easy.jsonl",
            McTask::ArcChallenge => "extra_mc/arc_challenge.jsonl",
            McTask::Winogrande => "extra_mc/winogrande.jsonl",
            McTask::MathQa => "mathqa/mathqa_dev.jsonl",
        }
    }

    /// Loads every item of the task from `data` (the `shared/data` folder).
    pub fn load(self, data: &Path) -> anyhow::Result<Vec<McItem>> {
        let path = data.join(self.file());
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut items = Vec::new();
        for (id, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |e: serde_json::Error| anyhow::anyhow!("{}:{}: {e}", path.display(), id + 1);
            let item = match self {
                McTask::HellaSwag => {
                    let r: HellaSwagRow = serde_json::from_str(line).map_err(bad)?;
                    McItem::shared(id, hellaswag_query(&r.activity_label, &r.ctx), r.endings, r.label)
                }
                McTask::Piqa => {
                    let r: PiqaRow = serde_json::from_str(line).map_err(bad)?;
                    McItem::shared(id, format!("Question: {}\nAnswer:", r.goal.trim()), vec![r.sol1, r.sol2], r.label)
                }
                McTask::ArcEasy | McTask::ArcChallenge => {
                    let r: QueryRow = serde_json::from_str(line).map_err(bad)?;
                    McItem::shared(id, format!("{}\nAnswer:", r.query.trim()), r.choices, r.gold)
                }
                McTask::MathQa => {
                    let r: MathQaRow = serde_json::from_str(line).map_err(bad)?;
                    McItem::shared(id, format!("Question: {}\nAnswer:", r.problem.trim()), r.choices, r.label)
                }
                McTask::Winogrande => {
                    let r: WinograndeRow = serde_json::from_str(line).map_err(bad)?;
                    let n = r.context_options.len();
                    McItem {
                        id,
                        contexts: r.context_options,
                        ctx_of: (0..n).collect(),
                        continuations: vec![format!(" {}", r.continuation.trim()); n],
                        label: r.gold,
                    }
                }
            };
            anyhow::ensure!(
                item.continuations.len() >= 2 && item.label < item.continuations.len(),
                "{}:{}: needs >= 2 choices and a label among them",
                path.display(),
                id + 1
            );
            items.push(item);
        }
        Ok(items)
    }
}

/// The lm-eval-harness HellaSwag query: `activity_label: ctx_a Ctx_b`. The
/// data keeps `ctx = ctx_a + " " + ctx_b` with `ctx_b` in lower case; `ctx_b`
/// is the text after the last sentence end, capitalised here.
pub fn hellaswag_query(label: &str, ctx: &str) -> String {
    let ctx = ctx.trim();
    let cut = ctx.rfind(". ").map_or(0, |i| i + 2);
    let (a, b) = ctx.split_at(cut);
    let mut chars = b.chars();
    let b = match chars.next() {
        Some(c) => c.to_uppercase().collect::<String>() + chars.as_str(),
        None => String::new(),
    };
    format!("{}: {a}{b}", label.trim())
}

#[derive(Deserialize)]
struct HellaSwagRow {
    activity_label: String,
    ctx: String,
    endings: Vec<String>,
    label: usize,
}

#[derive(Deserialize)]
struct PiqaRow {
    goal: String,
    sol1: String,
    sol2: String,
    label: usize,
}

#[derive(Deserialize)]
struct QueryRow {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

#[derive(Deserialize)]
struct MathQaRow {
    #[serde(rename = "Problem")]
    problem: String,
    choices: Vec<String>,
    label: usize,
}

#[derive(Deserialize)]
struct WinograndeRow {
    context_options: Vec<String>,
    continuation: String,
    gold: usize,
}

/// A retrieval item: a long `document` (prefilled), then a `question` that is
/// decoded token by token against the compressed cache, then the answer is
/// generated greedily and must start with `answer`.
#[derive(Clone, Debug, PartialEq)]
pub struct KvItem {
    /// `<position>:<line>` for the key–value files, `depth<d>:<n>` for passkeys.
    pub id: String,
    pub document: String,
    pub question: String,
    pub answer: String,
}

/// Splits an llm-foundry key–value context before its final `Key:` line: the
/// JSON object is the document, the key and "Corresponding Value:" the question.
fn split_question(context: &str) -> (String, String) {
    match context.rfind("Key:") {
        Some(i) => (context[..i].to_string(), context[i..].trim_end().to_string()),
        None => (context.to_string(), String::new()),
    }
}

/// Passkey retrieval (generated): a 5-digit pass key stated once at a depth
/// in repeated filler text of about `tokens` tokens (measured with `count`),
/// asked for at the end. `n` items at depths 5%, 15%, ..., 95% in turn; keys
/// from `seed`.
pub fn passkey_items(tokens: usize, n: usize, seed: u64, count: impl Fn(&str) -> usize) -> Vec<KvItem> {
    use rand::Rng;
    const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let per = count(FILLER).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ tokens as u64);
    (0..n)
        .map(|i| {
            let key: u32 = rng.random_range(10000..100000);
            let reps = tokens.saturating_sub(60) / per;
            let depth = (i % 10) * 10 + 5;
            let at = reps * depth / 100;
            let mut doc = String::from(
                "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n",
            );
            for r in 0..reps {
                if r == at {
                    doc.push_str(&format!("The pass key is {key}. Remember it. {key} is the pass key. "));
                }
                doc.push_str(FILLER);
            }
            KvItem {
                id: format!("depth{depth}:{i}"),
                document: doc,
                question: "\nWhat is the pass key? The pass key is".into(),
                answer: key.to_string(),
            }
        })
        .collect()
}

/// Where the gold pair sits in the retrieval files.
pub const KV_POSITIONS: [&str; 3] = ["beginning", "middle", "end"];

/// Loads the retrieval items of one nominal context length (2048, 4096, 8192).
pub fn load_kv(data: &Path, context: usize) -> anyhow::Result<Vec<KvItem>> {
    #[derive(Deserialize)]
    struct Row {
        context: String,
        answer: String,
    }
    let mut items = Vec::new();
    for pos in KV_POSITIONS {
        let path = data.join(format!("long_context/kv_pairs_{pos}_len_{context}.jsonl"));
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let r: Row =
                serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            let (document, question) = split_question(&r.context);
            items.push(KvItem { id: format!("{pos}:{i}"), document, question, answer: r.answer.trim().to_string() });
        }
    }
    Ok(items)
}

/// The first `limit` of `n` indices in a fixed pseudo-random order (`seed`):
/// a larger limit extends a smaller one's sample.
pub fn sample(n: usize, limit: Option<usize>, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx.truncate(limit.unwrap_or(n).min(n));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellaswag_query_capitalises_the_last_sentence() {
        assert_eq!(
            hellaswag_query("Roof shingle removal", "A man is sitting on a roof. he"),
            "Roof shingle removal: A man is sitting on a roof. He"
        );
        assert_eq!(hellaswag_query("Cooking", "the chef"), "Cooking: The chef");
        assert_eq!(hellaswag_query("X", ""), "X: ");
    }

    #[test]
    fn samples_are_seeded_and_nested() {
        let a = sample(100, Some(10), 42);
        let b = sample(100, Some(20), 42);
        assert_eq!(a[..], b[..10]);
        assert_ne!(a, sample(100, Some(10), 43));
        assert_eq!(sample(5, Some(99), 1).len(), 5);
        let mut all = sample(50, None, 7);
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn retrieval_prompts_split_and_passkeys_are_placed() {
        let (d, q) = split_question("JSON {\"a\": \"b\"}\n\nKey: \"a\"\nCorresponding Value: ");
        assert_eq!((d.as_str(), q.as_str()), ("JSON {\"a\": \"b\"}\n\n", "Key: \"a\"\nCorresponding Value:"));
        let words = |s: &str| s.split_whitespace().count();
        let items = passkey_items(2000, 12, 1, words);
        assert_eq!(items.len(), 12);
        for it in &items {
            assert_eq!(it.answer.len(), 5);
            assert_eq!(it.document.matches(&it.answer).count(), 2, "{}", it.id);
            let n = words(&it.document);
            assert!((1800..=2000).contains(&n), "{n}");
        }
        let pos = |it: &KvItem| it.document.find(&it.answer).unwrap() as f64 / it.document.len() as f64;
        assert!(pos(&items[0]) < 0.1 && pos(&items[9]) > 0.9, "{} {}", pos(&items[0]), pos(&items[9]));
        assert_eq!(items, passkey_items(2000, 12, 1, words));
    }

    #[test]
    fn shared_context_items_prefix_a_space() {
        let it = McItem::shared(3, "Q:".into(), vec!["a ".into(), "b".into()], 1);
        assert_eq!(it.continuations, vec![" a", " b"]);
        assert_eq!(it.ctx_of, vec![0, 0]);
    }
}

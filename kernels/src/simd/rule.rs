//! The plain types QAQ's window pass is given ([`super::window_pass`]): where a decode
//! row's observations come from and the width rule, as numbers. A leaf module, so that
//! the dispatcher and the x86 kernel both use it.

/// Where a window pass's new observations come from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Observed<'a> {
    /// The maximum over `g` rows of probabilities (`[g][T]`), from 0.
    Probs(&'a [f32], usize),
    /// One value per token, as it is.
    Values(&'a [f32]),
}

/// QAQ's width rule as plain numbers (`cache::requant::Targets` is its reference).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WidthRule {
    /// Tokens below this stay at `b_max`.
    pub sinks: usize,
    /// Keys wait for a full window at `b_max`.
    pub k_window: bool,
    pub b_min: u8,
    pub b_max: u8,
    /// The reference formula (`ceil(log2(r / (2E) + 1))`) instead of the paper's.
    pub reference: bool,
    /// `1 / E_K`; `None`: keys keep their widths.
    pub inv_ek: Option<f64>,
    /// `1 / (sqrt(12 / T) sigma_X)`.
    pub inv_vnum: f64,
}

/// A width the caller has to compute with the formula itself.
pub(crate) const UNDECIDED: u8 = 0xff;

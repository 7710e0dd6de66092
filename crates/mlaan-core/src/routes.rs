//! Gradient routes: where every gradient of a plan goes, derived once from its terms' reaches
//! (docs/method.md §4, docs/design.md "One mechanism for every method"). A term of module j
//! with reach r sends its gradient into modules j−r..j; a part arriving at module i from j
//! has r − (j − i) modules left to reach. Everything the engine needs to know about a module's
//! or a stage's traffic — whether it sends a gradient back, whether it expects one, whether a
//! later stage's parts pass through it, which inputs async must keep — is computed here, as
//! plain data tested without tensors; nothing else asks the plan.

use crate::plan::NetworkPlan;
use std::ops::Range;

/// How gradients pass through one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleRoutes {
    /// A gradient goes back to the module's input: module i−1 receives parts from it.
    pub input_grad: bool,
    /// Every gradient on the output also travels on to the input (its own terms' and every
    /// incoming part's), so one backward pass gives the parameter and the input gradient.
    pub all_continue: bool,
    /// Gradient parts from later modules arrive at it (MLAAN's cascades, e2e, GPipe).
    pub from_later: bool,
}

impl ModuleRoutes {
    /// The routes of module `i` of `plan`.
    pub fn of(plan: &NetworkPlan, i: usize) -> ModuleRoutes {
        let own = plan.modules[i].terms.iter().map(|t| t.reach);
        let mut reaches = own.chain(incoming(plan, i, i + 1)).peekable();
        let has_any = reaches.peek().is_some();
        ModuleRoutes {
            input_grad: i > 0 && incoming_reach_left(plan, i - 1, i).is_some(),
            all_continue: i > 0 && has_any && reaches.all(|r| r >= 1),
            from_later: incoming_reach_left(plan, i, i + 1).is_some(),
        }
    }
}

/// How gradients pass through a stage: its modules `modules` (consecutive, on one thread)
/// between the stages before and after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRoutes {
    pub modules: Range<usize>,
    /// The previous stage expects gradient messages from this one.
    pub prev_expects: bool,
    /// This stage expects gradient messages from the next one.
    pub expects_next: bool,
    /// Parts from the next stage can travel through this whole stage to the previous one.
    pub next_passes_through: bool,
    /// Per module of the stage: whether parts from a later stage can reach it, so that under
    /// `async` it keeps its input for their late arrival.
    pub keeps_input: Vec<bool>,
    /// Each module's own routes.
    pub module: Vec<ModuleRoutes>,
}

impl StageRoutes {
    pub fn of(plan: &NetworkPlan, modules: Range<usize>) -> StageRoutes {
        let (a, b) = (modules.start, modules.end);
        let from_next = incoming_reach_left(plan, b - 1, b);
        StageRoutes {
            prev_expects: a > 0 && incoming_reach_left(plan, a - 1, a).is_some(),
            expects_next: from_next.is_some(),
            next_passes_through: a > 0 && from_next.is_some_and(|r| r >= b - a),
            keeps_input: modules
                .clone()
                .map(|m| incoming_reach_left(plan, m, b).is_some())
                .collect(),
            module: modules.clone().map(|m| ModuleRoutes::of(plan, m)).collect(),
            modules,
        }
    }

    /// Whether an async step stores inputs for late gradients (some module receives them).
    pub fn stores_inputs(&self) -> bool {
        self.keeps_input.iter().any(|&k| k)
    }

    /// Whether the previous stage gets a message for a batch once parts have left this stage's
    /// front (`front_has_parts`), and if so whether it is the batch's last: after the early
    /// sweep (`after_next = None`) or after a message from the next stage (`Some(last)`, its
    /// `last` flag). A previous stage that expects gradients gets exactly one message marked
    /// `last` per batch: from the early sweep when nothing from later stages can pass through,
    /// else with the next stage's last one.
    pub fn back(&self, front_has_parts: bool, after_next: Option<bool>) -> Option<bool> {
        if !self.prev_expects {
            return None;
        }
        let last = match after_next {
            None => !self.next_passes_through,
            Some(last) => self.next_passes_through && last,
        };
        (last || front_has_parts).then_some(last)
    }
}

/// The reaches left of the parts arriving at module `i` from the terms of modules `j ≥ from`.
fn incoming(plan: &NetworkPlan, i: usize, from: usize) -> impl Iterator<Item = usize> + '_ {
    plan.modules
        .iter()
        .skip(from.max(i + 1))
        .flat_map(|m| m.terms.iter().map(move |t| (m.index, t.reach)))
        .filter(move |&(j, r)| r >= j - i)
        .map(move |(j, r)| r - (j - i))
}

/// The largest reach left of the parts arriving at module `i` from modules `j ≥ from` (a part
/// from a term at j with reach r arrives with r − (j − i)); `None` if none arrive.
pub fn incoming_reach_left(plan: &NetworkPlan, i: usize, from: usize) -> Option<usize> {
    incoming(plan, i, from).max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Chw;
    use crate::config::{Method, RunConfig};

    fn plan(method: Method, k: usize, d: usize) -> NetworkPlan {
        let mut c = RunConfig::default();
        c.model.arch = "resnet32".into();
        c.model.k = k;
        c.method.name = method;
        c.method.cascade_depth = d;
        NetworkPlan::new(&c, Chw { c: 3, h: 32, w: 32 }, 10).unwrap()
    }

    /// MLAAN d = 2, K = 4, written from docs/method.md §4 rather than from the code above:
    /// module i's cascade reaches i−1..i, the last module's loss K−2..K−1, module 0 has none.
    #[test]
    fn mlaan_d2_routes_follow_the_cascades() {
        let p = plan(Method::MlaanDgl, 4, 2);
        let r: Vec<ModuleRoutes> = (0..4).map(|i| ModuleRoutes::of(&p, i)).collect();
        // Module 0 gets step 1's cascade; 1 and 2 get the next step's; 3 gets nothing later.
        assert_eq!(r.iter().map(|m| m.from_later).collect::<Vec<_>>(), [true, true, true, false]);
        // Every module after 0 sends a gradient back (its cascade or the final loss reaches 1).
        assert_eq!(r.iter().map(|m| m.input_grad).collect::<Vec<_>>(), [false, true, true, true]);
        // Only the last one's every gradient goes on (its final loss reaches 1, nothing comes
        // later); modules 1 and 2 have an independent loss that stops there.
        assert_eq!(
            r.iter().map(|m| m.all_continue).collect::<Vec<_>>(),
            [false, false, false, true]
        );
    }

    #[test]
    fn dgl_sends_nothing_back_and_e2e_everything() {
        let p = plan(Method::Dgl, 4, 2);
        for i in 0..4 {
            let r = ModuleRoutes::of(&p, i);
            assert!(!r.input_grad && !r.from_later && !r.all_continue, "dgl module {i}");
        }
        let s = StageRoutes::of(&p, 2..4);
        assert!(!s.prev_expects && !s.expects_next && !s.stores_inputs());
        let p = plan(Method::E2e, 4, 2);
        let r: Vec<ModuleRoutes> = (0..4).map(|i| ModuleRoutes::of(&p, i)).collect();
        assert_eq!(r.iter().map(|m| m.input_grad).collect::<Vec<_>>(), [false, true, true, true]);
        assert_eq!(r.iter().map(|m| m.all_continue).collect::<Vec<_>>(), [false, true, true, true]);
        assert_eq!(r.iter().map(|m| m.from_later).collect::<Vec<_>>(), [true, true, true, false]);
    }

    /// Stages of MLAAN d = 3, K = 6: a part from the last stage can cross a one-module stage
    /// but not a two-module one; the first module of a stage keeps its input only if a later
    /// stage's part reaches that far.
    #[test]
    fn stage_routes_of_a_d3_split() {
        let p = plan(Method::MlaanDgl, 6, 3);
        let one = StageRoutes::of(&p, 3..4);
        assert!(one.prev_expects && one.expects_next && one.next_passes_through);
        let two = StageRoutes::of(&p, 2..4);
        assert!(two.prev_expects && two.expects_next && !two.next_passes_through);
        // From module 4 on, a part has reach left 1 at module 3 and 0 at module 2.
        assert_eq!(two.keeps_input, [true, true]);
        let last = StageRoutes::of(&p, 4..6);
        assert!(last.prev_expects && !last.expects_next && !last.stores_inputs());
        let first = StageRoutes::of(&p, 0..2);
        assert!(!first.prev_expects && first.expects_next);
        assert_eq!(first.keeps_input, [true, true]);
    }

    #[test]
    fn one_last_message_per_batch() {
        let p = plan(Method::MlaanDgl, 6, 3);
        let through = StageRoutes::of(&p, 3..4);
        // The early sweep is not the last when the next stage's parts pass through...
        assert_eq!(through.back(true, None), Some(false));
        assert_eq!(through.back(false, None), None);
        // ...the next stage's last message makes this one's last, even without parts.
        assert_eq!(through.back(false, Some(true)), Some(true));
        assert_eq!(through.back(true, Some(false)), Some(false));
        let stops = StageRoutes::of(&p, 2..4);
        assert_eq!(stops.back(false, None), Some(true));
        assert_eq!(stops.back(true, Some(true)), Some(false));
        assert_eq!(stops.back(false, Some(true)), None);
        assert_eq!(StageRoutes::of(&p, 0..2).back(true, None), None);
    }
}

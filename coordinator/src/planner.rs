//! The wave planner: which instances of a stack a deployment updates together, and in what order.
//!
//! It stands apart from the rollout so that the decision can be read and tested on its own: it is
//! pure (no I/O, no clock, no randomness), and the same instances given in any order yield the same
//! plan. The rollout carries the plan out; waiting for a wave to come back healthy is its job.
//!
//! # Rules
//!
//! - **Targets** are the instances that are neither lost nor pinned. A lost instance counts neither
//!   as healthy nor as a target. A pinned instance is a deliberate exception and is skipped, but
//!   if it is healthy it keeps serving, so it counts toward the stack's healthy total.
//! - Only a current healthy verdict makes an instance healthy: one with no verdict yet, or a stale
//!   one, is *unknown*, and the plan treats it like an unhealthy one (it cannot be counted on to
//!   serve, so it neither holds up the floor nor costs it anything).
//! - **All at once**: one wave holding every target, by id. No minimum-healthy floor applies:
//!   updating everything together is the operator's explicit choice.
//! - **Rolling**: a canary wave, then zone by zone in batches, never below the floor.
//!   - The *canary* is the first `canary` targets when targets are ranked healthy before
//!     unhealthy, then by zone name, then by id. That is the first healthy targets of the first
//!     zone (by name) that has one; if the canary is larger than that zone's healthy targets, the
//!     next healthy targets of the following zones, and unhealthy targets only once no healthy
//!     target is left. When no target is healthy, it is the first targets by id of the first zone.
//!   - *Zones* follow: the canary's zone first (it is already under way), then the others by name.
//!     Within a zone, the targets the canary did not take go by id in waves of `batch` of the
//!     zone's targets. The zone's size counts its canary instances, so that a canary does not
//!     change the batch size. Apart from the canary, no wave mixes zones.
//!   - The *floor* is `min_healthy` of the stack's size, that is of every instance that is not
//!     lost (healthy or not, pinned included). A wave takes its healthy instances out of service,
//!     so every wave must satisfy `healthy_total - healthy instances in the wave >= floor`.
//!     Unhealthy targets cost nothing. Waves fill in id order, and a wave closes early when the
//!     next target is healthy and the wave already takes out every healthy instance the floor can
//!     spare; the canary is cut short in the same way. So the floor shrinks waves, but no wave is
//!     smaller than the batch and the floor together require. If not even one healthy target can
//!     go without crossing the floor, planning fails with [`PlanError::MinHealthyUnreachable`].
//!     A wave without healthy instances cannot lower the healthy count, so it is planned even when
//!     the stack is already below the floor: a fix for a broken stack must remain deployable.
//!
//! # Rounding
//!
//! [`Amount::of`] rounds percentages up. For a batch this means every non-empty zone moves at least
//! one instance per wave; for the floor it is the safe reading: 75% of 6 instances is 4.5, and
//! the plan keeps 5 healthy, not 4.

use std::fmt;
use std::str::FromStr;

use crate::wording::count_of;

/// Canary instances of a rolling deployment, unless the operator says otherwise.
const DEFAULT_CANARY: u32 = 1;
/// Instances per wave of a rolling deployment, of a zone's targets, unless the operator says otherwise.
const DEFAULT_BATCH: Amount = Amount::Percent(25);
/// Healthy instances a rolling deployment keeps in service, of the stack, unless the operator says otherwise.
const DEFAULT_MIN_HEALTHY: Amount = Amount::Percent(75);

/// How an instance is doing, as the coordinator last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Serving: taking it out of service lowers the stack's healthy count.
    Healthy,
    /// Reachable but not serving: updating it costs the stack nothing.
    Unhealthy,
    /// Reachable, but no current verdict (none yet, or a stale one): it cannot be counted on to
    /// serve, so it is planned like an unhealthy instance.
    Unknown,
    /// Not heard from for too long: neither healthy nor a target.
    Lost,
}

/// An instance of the stack, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The instance id, unique within the stack.
    pub id: String,
    /// The availability zone; rolling waves go zone by zone.
    pub zone: String,
    /// The layer (role) of the instance within the stack. No planning rule reads it.
    pub layer: String,
    /// Whether the instance is serving, failing, or lost.
    pub health: Health,
    /// Held at its current release by the operator: skipped, never updated.
    pub pinned: bool,
}

/// A number of instances, absolute (`3`) or relative to a total (`25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// That many instances.
    Count(u32),
    /// That percentage of a total. Parsing accepts 1% to 100%.
    Percent(u8),
}

impl Amount {
    /// Resolves the amount against `total` instances. A count is taken as is, even above `total`
    /// (the caller decides what that means); a percentage rounds up (see the module docs).
    pub fn of(self, total: u32) -> u32 {
        match self {
            Amount::Count(count) => count,
            Amount::Percent(percent) => {
                let share = (u64::from(total) * u64::from(percent)).div_ceil(100);
                u32::try_from(share).unwrap_or(u32::MAX)
            }
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(count) => write!(formatter, "{count}"),
            Amount::Percent(percent) => write!(formatter, "{percent}%"),
        }
    }
}

/// Why a string is not an [`Amount`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAmount {
    #[error("{input:?} is not an amount: write a number of instances like 3 or a percentage like 25%")]
    Malformed { input: String },
    #[error("{input:?} is out of range: a percentage must be between 1% and 100%")]
    PercentOutOfRange { input: String },
    #[error("{input:?} is too large: a count must be at most {max}", max = u32::MAX)]
    CountTooLarge { input: String },
}

impl FromStr for Amount {
    type Err = InvalidAmount;

    /// Parses `3` or `25%`: digits only, no sign, no spaces, no fractions.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (digits, is_percent) = match input.strip_suffix('%') {
            Some(digits) => (digits, true),
            None => (input, false),
        };
        if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(InvalidAmount::Malformed { input: input.into() });
        }
        if is_percent {
            match digits.parse::<u8>() {
                Ok(percent @ 1..=100) => Ok(Amount::Percent(percent)),
                _ => Err(InvalidAmount::PercentOutOfRange { input: input.into() }),
            }
        } else {
            digits
                .parse()
                .map(Amount::Count)
                .map_err(|_| InvalidAmount::CountTooLarge { input: input.into() })
        }
    }
}

/// How a rolling deployment paces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollingOptions {
    /// How many instances update first, on their own; 0 for no canary wave.
    pub canary: u32,
    /// Instances per wave, of the zone's targets; fewer when the minimum-healthy floor requires.
    pub batch: Amount,
    /// Healthy instances to keep in service during every wave, of the stack's instances that are not lost.
    pub min_healthy: Amount,
}

impl Default for RollingOptions {
    /// One canary, batches of 25% of a zone (at least one instance), at least 75% of the stack healthy.
    fn default() -> Self {
        Self {
            canary: DEFAULT_CANARY,
            batch: DEFAULT_BATCH,
            min_healthy: DEFAULT_MIN_HEALTHY,
        }
    }
}

/// How a deployment reaches its targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// Every target in one wave. The minimum-healthy floor does not apply: it is the operator's explicit choice.
    AllAtOnce,
    /// A canary, then zone by zone in batches, above the minimum-healthy floor.
    Rolling(RollingOptions),
}

/// What a wave is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaveKind {
    /// The first instances, updated alone to try the release out.
    Canary,
    /// A batch of the named zone.
    Zone(String),
    /// Every target (all at once).
    All,
}

/// Instances that update together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    /// Why these instances go together.
    pub kind: WaveKind,
    /// Their ids, never empty.
    pub instances: Vec<String>,
}

/// Why an instance is left out of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The operator holds it at its current release.
    Pinned,
    /// Not heard from for too long. A lost instance is reported as lost even when it is pinned too.
    Lost,
}

/// An instance the plan leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The instance id.
    pub id: String,
    /// Why it is left out.
    pub reason: SkipReason,
}

/// The waves of a deployment, in order, with the numbers they were planned against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The waves, in the order they run; each target is in exactly one.
    pub waves: Vec<Wave>,
    /// The instances left out, by id.
    pub skipped: Vec<Skipped>,
    /// The instances that are not lost (healthy or not, pinned included): what `min_healthy` is a share of.
    pub stack_size: u32,
    /// The healthy instances, pinned included.
    pub healthy_total: u32,
    /// The minimum-healthy floor: healthy instances every wave leaves in service. 0 for all at once, which applies none.
    pub min_healthy: u32,
}

/// Why no plan can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("instance {id:?} is listed twice; instance ids are unique within a stack, so the caller's list is wrong")]
    DuplicateInstance { id: String },
    #[error("--batch {batch} puts no instance in a wave, so the deployment could never finish; use --batch 1 or more")]
    EmptyBatch { batch: Amount },
    #[error(
        "no instance to deploy to: the stack has {pinned} pinned and {lost} lost instances and no other; \
         unpin instances, wait for lost ones to reconnect, or join new ones"
    )]
    NoTargets { pinned: u32, lost: u32 },
    #[error(
        "--min-healthy {min_healthy} means {floor} of the stack's {stack} must stay healthy during \
         every wave, and {healthy_total} {are} healthy now: no wave could take a healthy instance out of service; \
         lower --min-healthy to {highest_workable} or less, or make more instances healthy",
        stack = count_of(*.stack_size as usize, "instance", "instances"),
        are = if *.healthy_total == 1 { "is" } else { "are" },
        highest_workable = .healthy_total.saturating_sub(1)
    )]
    MinHealthyUnreachable {
        min_healthy: Amount,
        floor: u32,
        stack_size: u32,
        healthy_total: u32,
    },
}

/// Plans the waves that deploy to `instances` with `strategy`, following the rules of the module docs.
pub fn plan(instances: &[Candidate], strategy: &Strategy) -> Result<Plan, PlanError> {
    let mut by_id: Vec<&Candidate> = instances.iter().collect();
    by_id.sort_by(|left, right| left.id.cmp(&right.id));
    if let Some(twins) = by_id.windows(2).find(|pair| pair[0].id == pair[1].id) {
        return Err(PlanError::DuplicateInstance {
            id: twins[0].id.clone(),
        });
    }
    if let Strategy::Rolling(options) = strategy
        && matches!(options.batch, Amount::Count(0) | Amount::Percent(0))
    {
        return Err(PlanError::EmptyBatch { batch: options.batch });
    }

    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for &instance in &by_id {
        match instance.skip_reason() {
            Some(reason) => skipped.push(Skipped {
                id: instance.id.clone(),
                reason,
            }),
            None => targets.push(instance),
        }
    }
    if targets.is_empty() {
        let skipped_for = |reason| saturating_u32(skipped.iter().filter(|skip| skip.reason == reason).count());
        return Err(PlanError::NoTargets {
            pinned: skipped_for(SkipReason::Pinned),
            lost: skipped_for(SkipReason::Lost),
        });
    }
    let stack_size = saturating_u32(by_id.iter().filter(|instance| instance.health != Health::Lost).count());
    let healthy_total = saturating_u32(by_id.iter().filter(|instance| instance.is_healthy()).count());

    let (waves, min_healthy) = match strategy {
        Strategy::AllAtOnce => {
            let everything = Wave {
                kind: WaveKind::All,
                instances: ids(&targets),
            };
            (vec![everything], 0)
        }
        Strategy::Rolling(options) => {
            let floor = options.min_healthy.of(stack_size);
            // The healthy instances above the floor: how many one wave may take out of service.
            let spare = healthy_total.saturating_sub(floor);
            if spare == 0 && targets.iter().any(|target| target.is_healthy()) {
                return Err(PlanError::MinHealthyUnreachable {
                    min_healthy: options.min_healthy,
                    floor,
                    stack_size,
                    healthy_total,
                });
            }
            (rolling_waves(&targets, options, spare), floor)
        }
    };
    Ok(Plan {
        waves,
        skipped,
        stack_size,
        healthy_total,
        min_healthy,
    })
}

impl Candidate {
    fn is_healthy(&self) -> bool {
        self.health == Health::Healthy
    }

    /// Why the plan leaves this instance out, if it does. Lost comes first: a lost instance could
    /// not be updated, pinned or not.
    fn skip_reason(&self) -> Option<SkipReason> {
        if self.health == Health::Lost {
            Some(SkipReason::Lost)
        } else if self.pinned {
            Some(SkipReason::Pinned)
        } else {
            None
        }
    }
}

/// The canary wave, then the zones' batches. `targets` are sorted by id; no wave takes more than
/// `spare` healthy instances out of service.
fn rolling_waves(targets: &[&Candidate], options: &RollingOptions, spare: u32) -> Vec<Wave> {
    let canary = pick_canary(targets, options.canary, spare);
    let mut waves = Vec::new();
    if !canary.is_empty() {
        waves.push(Wave {
            kind: WaveKind::Canary,
            instances: ids(&canary),
        });
    }
    let canary_zone = canary.first().map(|instance| instance.zone.as_str());
    for zone in zone_order(targets, canary_zone) {
        let in_zone: Vec<&Candidate> = targets.iter().copied().filter(|target| target.zone == zone).collect();
        // At least 1, though a zero batch was refused before planning and a zone here has targets.
        let batch_size = options.batch.of(saturating_u32(in_zone.len())).max(1);
        let left: Vec<&Candidate> = in_zone
            .into_iter()
            .filter(|target| !canary.iter().any(|taken| taken.id == target.id))
            .collect();
        for wave in fill_waves(&left, batch_size, spare) {
            waves.push(Wave {
                kind: WaveKind::Zone(zone.to_owned()),
                instances: ids(&wave),
            });
        }
    }
    waves
}

/// The first `canary` targets, ranked healthy first, then by zone, then by id; cut short before
/// the healthy instance that would take the stack below the floor.
fn pick_canary<'a>(targets: &[&'a Candidate], canary: u32, spare: u32) -> Vec<&'a Candidate> {
    let mut ranked = targets.to_vec();
    ranked.sort_by_key(|target| (!target.is_healthy(), target.zone.as_str(), target.id.as_str()));
    let mut picked = Vec::new();
    let mut healthy_picked = 0;
    for target in ranked.into_iter().take(canary as usize) {
        if target.is_healthy() {
            if healthy_picked == spare {
                break;
            }
            healthy_picked += 1;
        }
        picked.push(target);
    }
    picked
}

/// The zones that have targets: the canary's zone first, then the others by name.
fn zone_order<'a>(targets: &[&'a Candidate], canary_zone: Option<&str>) -> Vec<&'a str> {
    let mut zones: Vec<&str> = targets.iter().map(|target| target.zone.as_str()).collect();
    zones.sort_unstable();
    zones.dedup();
    // A stable sort on "is not the canary's zone" moves that zone to the front and keeps the rest by name.
    zones.sort_by_key(|zone| Some(*zone) != canary_zone);
    zones
}

/// Cuts a zone's targets, in id order, into waves of at most `batch_size` instances that each take
/// at most `spare` healthy instances out of service. A wave closes when it is full, or when the
/// next target is healthy and the wave already takes out all the spare. Unhealthy targets ride
/// along for free.
fn fill_waves<'a>(targets: &[&'a Candidate], batch_size: u32, spare: u32) -> Vec<Vec<&'a Candidate>> {
    let mut waves = Vec::new();
    let mut wave = Vec::new();
    let mut healthy_in_wave = 0;
    for &target in targets {
        let full = wave.len() >= batch_size as usize;
        let spare_used_up = target.is_healthy() && healthy_in_wave == spare;
        if !wave.is_empty() && (full || spare_used_up) {
            waves.push(std::mem::take(&mut wave));
            healthy_in_wave = 0;
        }
        if target.is_healthy() {
            healthy_in_wave += 1;
        }
        wave.push(target);
    }
    if !wave.is_empty() {
        waves.push(wave);
    }
    waves
}

impl Plan {
    /// How many instances a rollback of this plan switches back at a time: the deployment's batch (the largest
    /// wave after the canary; every target for all at once), and no more than the healthy instances the floor can
    /// spare, so that switching back never takes the stack below the floor a wave could not cross either. At least
    /// one, so that a rollback always moves. A rollback has no canary and no bake: the release already failed.
    pub fn switch_back_batch(&self) -> u32 {
        let largest = |with_canary: bool| {
            self.waves
                .iter()
                .filter(|wave| with_canary || wave.kind != WaveKind::Canary)
                .map(|wave| saturating_u32(wave.instances.len()))
                .max()
        };
        let batch = largest(false).or_else(|| largest(true)).unwrap_or(1);
        let capped = if self.min_healthy == 0 {
            batch
        } else {
            batch.min(self.healthy_total.saturating_sub(self.min_healthy))
        };
        capped.max(1)
    }
}

fn ids(instances: &[&Candidate]) -> Vec<String> {
    instances.iter().map(|instance| instance.id.clone()).collect()
}

fn saturating_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use proptest::prelude::{
        Just, ProptestConfig, TestCaseError, any, prop_assert, prop_assert_eq, prop_oneof, proptest,
    };
    use proptest::strategy::Strategy as _;

    use super::*;

    /// Bounds of the generated stacks.
    const MAX_ZONES: usize = 5;
    const MAX_PER_ZONE: usize = 12;

    /// Builds a stack from `zone: id id …; zone: …`. An id may end in `?` (unhealthy), `~` (no
    /// current verdict) or `!` (lost) and in `@` (pinned); the others are healthy.
    fn stack(spec: &str) -> Vec<Candidate> {
        let mut instances = Vec::new();
        for group in spec.split(';').filter(|group| !group.trim().is_empty()) {
            let (zone, tokens) = group.split_once(':').expect("a group reads `zone: id id …`");
            for token in tokens.split_whitespace() {
                let health = if token.contains('!') {
                    Health::Lost
                } else if token.contains('?') {
                    Health::Unhealthy
                } else if token.contains('~') {
                    Health::Unknown
                } else {
                    Health::Healthy
                };
                instances.push(Candidate {
                    id: token.trim_end_matches(['?', '~', '!', '@']).into(),
                    zone: zone.trim().into(),
                    layer: "web".into(),
                    health,
                    pinned: token.contains('@'),
                });
            }
        }
        instances
    }

    fn rolling(canary: u32, batch: &str, min_healthy: &str) -> Strategy {
        Strategy::Rolling(RollingOptions {
            canary,
            batch: batch.parse().expect("a valid batch"),
            min_healthy: min_healthy.parse().expect("a valid min-healthy"),
        })
    }

    fn defaults() -> Strategy {
        Strategy::Rolling(RollingOptions::default())
    }

    #[test]
    fn a_rollback_switches_back_a_batch_at_a_time_within_the_floor() {
        let batch = |spec: &str, strategy: &Strategy| plan(&stack(spec), strategy).expect("a plan").switch_back_batch();
        let eight = "a: a1 a2 a3 a4; b: b1 b2 b3 b4";
        // The zone batch (50 % of 4), the canary aside; a floor of 75 % of 8 spares 2.
        assert_eq!(batch(eight, &rolling(1, "50%", "75%")), 2);
        // The floor spares fewer than the batch: 7 of 8 must stay, so one at a time.
        assert_eq!(batch(eight, &rolling(1, "4", "7")), 1);
        // No floor: the batch alone.
        assert_eq!(batch(eight, &rolling(1, "3", "0")), 3);
        // All at once switches back everything together, as it deployed.
        assert_eq!(batch(eight, &Strategy::AllAtOnce), 8);
        // A canary alone (a stack of one) still moves.
        assert_eq!(batch("a: a1", &rolling(1, "25%", "0")), 1);
    }

    /// `canary:[a1] z1:[a2 a3] … | skipped a4 (pinned) | healthy 6 of 6, floor 5`, or `error: …`.
    fn render(result: &Result<Plan, PlanError>) -> String {
        let plan = match result {
            Ok(plan) => plan,
            Err(error) => return format!("error: {error}"),
        };
        let waves: Vec<String> = plan
            .waves
            .iter()
            .map(|wave| {
                let kind = match &wave.kind {
                    WaveKind::Canary => "canary",
                    WaveKind::Zone(zone) => zone,
                    WaveKind::All => "all",
                };
                format!("{kind}:[{}]", wave.instances.join(" "))
            })
            .collect();
        let mut parts = vec![waves.join(" ")];
        if !plan.skipped.is_empty() {
            let skipped: Vec<String> = plan
                .skipped
                .iter()
                .map(|skip| match skip.reason {
                    SkipReason::Pinned => format!("{} (pinned)", skip.id),
                    SkipReason::Lost => format!("{} (lost)", skip.id),
                })
                .collect();
            parts.push(format!("skipped {}", skipped.join(", ")));
        }
        parts.push(format!(
            "healthy {} of {}, floor {}",
            plan.healthy_total, plan.stack_size, plan.min_healthy
        ));
        parts.join(" | ")
    }

    /// Plans `spec` with `strategy`, compares with `expected`, and checks the rules the property
    /// tests check, and that the reversed input gives the same plan.
    fn check(spec: &str, strategy: Strategy, expected: Expect) {
        let instances = stack(spec);
        let result = plan(&instances, &strategy);
        expected.assert_eq(&render(&result));
        if let Err(broken) = check_rules(&instances, &strategy, &result) {
            panic!("{spec} with {strategy:?}: {broken}");
        }
        let reversed: Vec<Candidate> = instances.iter().rev().cloned().collect();
        assert_eq!(plan(&reversed, &strategy), result, "the input order must not matter");
    }

    const SIX_IN_THREE_ZONES: &str = "z1: a1 a2; z2: b1 b2; z3: c1 c2";

    #[test]
    fn six_instances_in_three_zones_go_canary_first_then_one_at_a_time_with_the_defaults() {
        check(
            SIX_IN_THREE_ZONES,
            defaults(),
            expect!["canary:[a1] z1:[a2] z2:[b1] z2:[b2] z3:[c1] z3:[c2] | healthy 6 of 6, floor 5"],
        );
    }

    #[test]
    fn a_canary_of_zero_means_no_canary_wave() {
        check(
            SIX_IN_THREE_ZONES,
            rolling(0, "25%", "75%"),
            expect!["z1:[a1] z1:[a2] z2:[b1] z2:[b2] z3:[c1] z3:[c2] | healthy 6 of 6, floor 5"],
        );
    }

    #[test]
    fn a_canary_of_two_takes_the_first_zone_whole() {
        check(
            SIX_IN_THREE_ZONES,
            rolling(2, "25%", "50%"),
            expect!["canary:[a1 a2] z2:[b1] z2:[b2] z3:[c1] z3:[c2] | healthy 6 of 6, floor 3"],
        );
    }

    #[test]
    fn a_canary_larger_than_the_first_zone_continues_into_the_next_zone() {
        check(
            SIX_IN_THREE_ZONES,
            rolling(3, "25%", "50%"),
            expect!["canary:[a1 a2 b1] z2:[b2] z3:[c1] z3:[c2] | healthy 6 of 6, floor 3"],
        );
    }

    #[test]
    fn a_canary_prefers_healthy_instances_of_later_zones_to_unhealthy_ones_of_its_own() {
        check(
            "z1: a1 a2?; z2: b1",
            rolling(2, "25%", "0"),
            expect!["canary:[a1 b1] z1:[a2] | healthy 2 of 3, floor 0"],
        );
    }

    /// Field trial: an instance with no health verdict yet counted as healthy in the floor.
    #[test]
    fn instances_without_a_current_verdict_do_not_hold_up_the_floor() {
        check(
            "z1: a1 a2~; z2: b1 b2~; z3: c1 c2",
            rolling(1, "1", "50%"),
            expect!["canary:[a1] z1:[a2] z2:[b1] z2:[b2] z3:[c1] z3:[c2] | healthy 4 of 6, floor 3"],
        );
        check(
            "z1: a1 a2~; z2: b1~ b2~",
            rolling(1, "1", "75%"),
            expect![
                "error: --min-healthy 75% means 3 of the stack's 4 instances must stay healthy during every wave, and 1 is healthy now: no wave could take a healthy instance out of service; lower --min-healthy to 0 or less, or make more instances healthy"
            ],
        );
        check(
            "z1: a1~ a2~; z2: b1~",
            rolling(1, "1", "75%"),
            expect!["canary:[a1] z1:[a2] z2:[b1] | healthy 0 of 3, floor 3"],
        );
    }

    #[test]
    fn a_canary_larger_than_the_stack_takes_every_target() {
        check(
            "z1: a1; z2: b1",
            rolling(5, "1", "0"),
            expect!["canary:[a1 b1] | healthy 2 of 2, floor 0"],
        );
    }

    #[test]
    fn a_canary_larger_than_the_floor_allows_is_cut_short() {
        check(
            SIX_IN_THREE_ZONES,
            rolling(2, "25%", "75%"),
            expect!["canary:[a1] z1:[a2] z2:[b1] z2:[b2] z3:[c1] z3:[c2] | healthy 6 of 6, floor 5"],
        );
    }

    #[test]
    fn a_batch_given_as_a_count_takes_that_many_instances_of_a_zone() {
        check(
            SIX_IN_THREE_ZONES,
            rolling(1, "2", "50%"),
            expect!["canary:[a1] z1:[a2] z2:[b1 b2] z3:[c1 c2] | healthy 6 of 6, floor 3"],
        );
    }

    #[test]
    fn a_batch_given_as_a_percentage_rounds_up() {
        check(
            "z1: a1 a2 a3; z2: b1 b2 b3",
            rolling(0, "50%", "50%"),
            expect!["z1:[a1 a2] z1:[a3] z2:[b1 b2] z2:[b3] | healthy 6 of 6, floor 3"],
        );
    }

    #[test]
    fn a_zone_of_eight_goes_in_batches_of_two_at_25_percent() {
        check(
            "z1: a1 a2 a3 a4 a5 a6 a7 a8",
            rolling(0, "25%", "50%"),
            expect!["z1:[a1 a2] z1:[a3 a4] z1:[a5 a6] z1:[a7 a8] | healthy 8 of 8, floor 4"],
        );
    }

    #[test]
    fn the_batch_size_counts_the_canary_as_part_of_its_zone() {
        check(
            "z1: a1 a2 a3 a4 a5 a6 a7 a8",
            rolling(1, "25%", "50%"),
            expect!["canary:[a1] z1:[a2 a3] z1:[a4 a5] z1:[a6 a7] z1:[a8] | healthy 8 of 8, floor 4"],
        );
    }

    #[test]
    fn lost_instances_are_skipped_and_left_out_of_the_stack_size() {
        check(
            "z1: a1 a2!; z2: b1 b2; z3: c1 c2",
            defaults(),
            expect!["canary:[a1] z2:[b1] z2:[b2] z3:[c1] z3:[c2] | skipped a2 (lost) | healthy 5 of 5, floor 4"],
        );
    }

    #[test]
    fn pinned_instances_are_skipped_but_count_as_healthy() {
        // Without the pinned a2 among the healthy, 3 of 4 would leave no spare healthy instance.
        check(
            "z1: a1 a2@; z2: b1 b2",
            defaults(),
            expect!["canary:[a1] z2:[b1] z2:[b2] | skipped a2 (pinned) | healthy 4 of 4, floor 3"],
        );
    }

    #[test]
    fn a_pinned_lost_instance_is_reported_as_lost() {
        check(
            "z1: a1 a2!@ a3@",
            rolling(0, "1", "0"),
            expect!["z1:[a1] | skipped a2 (lost), a3 (pinned) | healthy 2 of 2, floor 0"],
        );
    }

    #[test]
    fn unhealthy_instances_are_planned_and_ride_along_without_costing_the_floor() {
        check(
            "z1: a1 a2 a3? a4? a5 a6",
            rolling(0, "100%", "3"),
            expect!["z1:[a1] z1:[a2 a3 a4] z1:[a5] z1:[a6] | healthy 4 of 6, floor 3"],
        );
    }

    #[test]
    fn a_stack_with_no_healthy_target_is_planned_even_below_the_floor() {
        check(
            "z1: a1? a2?; z2: b1?",
            defaults(),
            expect!["canary:[a1] z1:[a2] z2:[b1] | healthy 0 of 3, floor 3"],
        );
    }

    #[test]
    fn when_the_first_zone_has_no_healthy_target_the_canary_and_its_zone_come_from_the_next() {
        check(
            "z1: a1? a2?; z2: b1 b2; z3: c1 c2",
            rolling(1, "25%", "50%"),
            expect!["canary:[b1] z2:[b2] z1:[a1] z1:[a2] z3:[c1] z3:[c2] | healthy 4 of 6, floor 3"],
        );
    }

    #[test]
    fn all_at_once_is_one_wave_of_every_target_by_id() {
        check(
            "z1: b2 b1?; z2: a1 a2! a3@",
            Strategy::AllAtOnce,
            expect!["all:[a1 b1 b2] | skipped a2 (lost), a3 (pinned) | healthy 3 of 4, floor 0"],
        );
    }

    #[test]
    fn all_at_once_ignores_the_floor_that_stops_a_rolling_deployment() {
        check(
            "z1: a1 a2 a3",
            Strategy::AllAtOnce,
            expect!["all:[a1 a2 a3] | healthy 3 of 3, floor 0"],
        );
    }

    #[test]
    fn the_floor_splits_a_batch_into_smaller_waves() {
        check(
            "z1: a1 a2 a3 a4 a5 a6",
            rolling(0, "100%", "4"),
            expect!["z1:[a1 a2] z1:[a3 a4] z1:[a5 a6] | healthy 6 of 6, floor 4"],
        );
    }

    #[test]
    fn waves_shrunk_by_the_floor_are_as_large_as_the_floor_allows() {
        // Batches of 3 with 2 healthy to spare: waves of 2, not 2 then the batch's leftover 1.
        check(
            "z1: a1 a2 a3 a4 a5 a6",
            rolling(0, "3", "4"),
            expect!["z1:[a1 a2] z1:[a3 a4] z1:[a5 a6] | healthy 6 of 6, floor 4"],
        );
    }

    #[test]
    fn a_floor_that_leaves_no_healthy_instance_to_spare_is_refused() {
        // 75% of 3 is 2.25, rounded up to 3: all of them.
        check(
            "z1: a1 a2 a3",
            defaults(),
            expect![
                "error: --min-healthy 75% means 3 of the stack's 3 instances must stay healthy during every wave, and 3 are healthy now: no wave could take a healthy instance out of service; lower --min-healthy to 2 or less, or make more instances healthy"
            ],
        );
        check(
            "z1: a1 a2 a3?; z2: b1 b2 b3?",
            defaults(),
            expect![
                "error: --min-healthy 75% means 5 of the stack's 6 instances must stay healthy during every wave, and 4 are healthy now: no wave could take a healthy instance out of service; lower --min-healthy to 3 or less, or make more instances healthy"
            ],
        );
    }

    #[test]
    fn a_stack_without_targets_is_refused() {
        check(
            "z1: a1@ a2!",
            defaults(),
            expect![
                "error: no instance to deploy to: the stack has 1 pinned and 1 lost instances and no other; unpin instances, wait for lost ones to reconnect, or join new ones"
            ],
        );
        check(
            "",
            Strategy::AllAtOnce,
            expect![
                "error: no instance to deploy to: the stack has 0 pinned and 0 lost instances and no other; unpin instances, wait for lost ones to reconnect, or join new ones"
            ],
        );
    }

    #[test]
    fn a_batch_of_zero_is_refused() {
        check(
            SIX_IN_THREE_ZONES,
            rolling(1, "0", "75%"),
            expect![
                "error: --batch 0 puts no instance in a wave, so the deployment could never finish; use --batch 1 or more"
            ],
        );
    }

    #[test]
    fn an_instance_listed_twice_is_refused() {
        check(
            "z1: a1; z2: a1",
            defaults(),
            expect![[
                r#"error: instance "a1" is listed twice; instance ids are unique within a stack, so the caller's list is wrong"#
            ]],
        );
    }

    #[test]
    fn amounts_parse_as_counts_or_percentages_and_nothing_else() {
        let cases = [
            ("3", "Count(3)"),
            ("0", "Count(0)"),
            ("25%", "Percent(25)"),
            ("1%", "Percent(1)"),
            ("100%", "Percent(100)"),
            (
                "0%",
                r#"error: "0%" is out of range: a percentage must be between 1% and 100%"#,
            ),
            (
                "101%",
                r#"error: "101%" is out of range: a percentage must be between 1% and 100%"#,
            ),
            (
                "300%",
                r#"error: "300%" is out of range: a percentage must be between 1% and 100%"#,
            ),
            (
                "abc",
                r#"error: "abc" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "",
                r#"error: "" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "%",
                r#"error: "%" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "-1",
                r#"error: "-1" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "+3",
                r#"error: "+3" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                " 3",
                r#"error: " 3" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "2.5%",
                r#"error: "2.5%" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "25%%",
                r#"error: "25%%" is not an amount: write a number of instances like 3 or a percentage like 25%"#,
            ),
            (
                "4294967296",
                r#"error: "4294967296" is too large: a count must be at most 4294967295"#,
            ),
        ];
        for (input, expected) in cases {
            let actual = match input.parse::<Amount>() {
                Ok(amount) => format!("{amount:?}"),
                Err(refused) => format!("error: {refused}"),
            };
            assert_eq!(actual, expected, "{input:?}");
        }
    }

    #[test]
    fn amounts_display_as_they_are_written() {
        assert_eq!(Amount::Percent(25).to_string(), "25%");
        assert_eq!(Amount::Count(3).to_string(), "3");
    }

    #[test]
    fn percentages_round_up_and_counts_stay_as_given() {
        let cases = [
            // (amount, total, expected)
            (Amount::Percent(75), 6, 5), // 4.5: keep the safer 5 healthy
            (Amount::Percent(75), 4, 3),
            (Amount::Percent(25), 2, 1), // half an instance is one
            (Amount::Percent(25), 8, 2),
            (Amount::Percent(100), 7, 7),
            (Amount::Percent(1), 0, 0),
            (Amount::Percent(100), u32::MAX, u32::MAX),
            (Amount::Percent(255), u32::MAX, u32::MAX), // saturates rather than wraps
            (Amount::Count(3), 1, 3),
            (Amount::Count(0), 10, 0),
        ];
        for (amount, total, expected) in cases {
            assert_eq!(amount.of(total), expected, "{amount} of {total}");
        }
    }

    #[test]
    fn the_default_rolling_options_are_one_canary_quarter_batches_and_three_quarters_healthy() {
        let defaults = RollingOptions::default();
        assert_eq!(
            (
                defaults.canary,
                defaults.batch.to_string(),
                defaults.min_healthy.to_string()
            ),
            (1, "25%".to_owned(), "75%".to_owned())
        );
    }

    /// The floor, computed the slow way: the smallest whole number of instances at least the percentage.
    fn floor_by_search(min_healthy: Amount, stack_size: u32) -> u32 {
        match min_healthy {
            Amount::Count(count) => count,
            Amount::Percent(percent) => (0..)
                .find(|floor| floor * 100 >= stack_size * u32::from(percent))
                .expect("stack_size itself is large enough"),
        }
    }

    /// Checks every rule of the module docs against one planning result.
    fn check_rules(
        instances: &[Candidate],
        strategy: &Strategy,
        result: &Result<Plan, PlanError>,
    ) -> Result<(), TestCaseError> {
        let targets: Vec<&Candidate> = instances
            .iter()
            .filter(|instance| instance.health != Health::Lost && !instance.pinned)
            .collect();
        let stack_size = instances
            .iter()
            .filter(|instance| instance.health != Health::Lost)
            .count() as u32;
        let healthy_total = instances
            .iter()
            .filter(|instance| instance.health == Health::Healthy)
            .count() as u32;
        let is_healthy = |id: &String| {
            instances
                .iter()
                .any(|instance| &instance.id == id && instance.is_healthy())
        };
        let any_healthy_target = targets.iter().any(|target| target.is_healthy());
        let floor = match strategy {
            Strategy::AllAtOnce => 0,
            Strategy::Rolling(options) => floor_by_search(options.min_healthy, stack_size),
        };

        // Errors come exactly when the rules say.
        let mut ids: Vec<&String> = instances.iter().map(|instance| &instance.id).collect();
        ids.sort();
        let has_twins = ids.windows(2).any(|pair| pair[0] == pair[1]);
        let empty_batch = matches!(strategy, Strategy::Rolling(options) if options.batch.of(1) == 0);
        prop_assert_eq!(matches!(result, Err(PlanError::DuplicateInstance { .. })), has_twins);
        prop_assert_eq!(
            matches!(result, Err(PlanError::EmptyBatch { .. })),
            empty_batch && !has_twins
        );
        if has_twins || empty_batch {
            return Ok(());
        }
        let plan = match result {
            Err(PlanError::NoTargets { .. }) => {
                prop_assert!(targets.is_empty());
                return Ok(());
            }
            Err(PlanError::MinHealthyUnreachable { .. }) => {
                prop_assert!(matches!(strategy, Strategy::Rolling(_)));
                prop_assert!(any_healthy_target, "only a healthy target can break the floor");
                prop_assert!(
                    healthy_total < floor + 1,
                    "taking out one healthy target must break the floor"
                );
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(format!("unexpected error: {other}"))),
            Ok(plan) => plan,
        };
        prop_assert!(!targets.is_empty());
        prop_assert!(
            !any_healthy_target || healthy_total > floor,
            "a healthy target could go, yet no plan"
        );
        prop_assert_eq!(
            (plan.stack_size, plan.healthy_total, plan.min_healthy),
            (stack_size, healthy_total, floor)
        );

        // Every target exactly once; nothing else, so no lost or pinned instance; the rest skipped.
        let mut planned: Vec<&String> = plan.waves.iter().flat_map(|wave| &wave.instances).collect();
        planned.sort();
        let mut target_ids: Vec<&String> = targets.iter().map(|target| &target.id).collect();
        target_ids.sort();
        prop_assert_eq!(&planned, &target_ids);
        let mut skipped: Vec<&String> = plan.skipped.iter().map(|skip| &skip.id).collect();
        skipped.sort();
        let mut left_out: Vec<&String> = instances
            .iter()
            .filter(|instance| instance.health == Health::Lost || instance.pinned)
            .map(|instance| &instance.id)
            .collect();
        left_out.sort();
        prop_assert_eq!(skipped, left_out);
        prop_assert!(
            plan.waves.iter().all(|wave| !wave.instances.is_empty()),
            "an empty wave"
        );

        // The floor holds for every wave that takes a healthy instance out.
        for wave in &plan.waves {
            let healthy_in_wave = wave.instances.iter().filter(|id| is_healthy(id)).count() as u32;
            prop_assert!(
                healthy_in_wave == 0 || healthy_total - healthy_in_wave >= floor,
                "{wave:?} takes {healthy_in_wave} of {healthy_total} healthy out, below {floor}"
            );
        }

        let options = match strategy {
            Strategy::AllAtOnce => {
                prop_assert_eq!(plan.waves.len(), 1);
                prop_assert_eq!(&plan.waves[0].kind, &WaveKind::All);
                prop_assert!(plan.waves[0].instances.is_sorted(), "all at once goes by id");
                return Ok(());
            }
            Strategy::Rolling(options) => options,
        };

        // The canary comes first, alone of its kind, no larger than asked, led by the first
        // target ranked healthy first, then by zone, then by id.
        let canary_waves = plan.waves.iter().filter(|wave| wave.kind == WaveKind::Canary).count();
        let has_canary = plan.waves[0].kind == WaveKind::Canary;
        prop_assert_eq!(
            canary_waves,
            usize::from(has_canary),
            "the canary wave can only come first"
        );
        prop_assert_eq!(has_canary, options.canary > 0);
        let mut canary_zone = None;
        if has_canary {
            let canary = &plan.waves[0].instances;
            prop_assert!(canary.len() <= options.canary as usize);
            let leader = targets
                .iter()
                .min_by_key(|target| (!target.is_healthy(), &target.zone, &target.id))
                .expect("there are targets");
            prop_assert_eq!(&canary[0], &leader.id);
            canary_zone = Some(leader.zone.clone());
        }

        // Then zones, each whole before the next: the canary's zone first, the others by name;
        // within a zone, by id, in waves no larger than the batch.
        let zone_waves = &plan.waves[usize::from(has_canary)..];
        let mut zones_seen: Vec<&String> = Vec::new();
        let mut ids_by_zone: Vec<Vec<&String>> = Vec::new();
        for wave in zone_waves {
            let WaveKind::Zone(zone) = &wave.kind else {
                return Err(TestCaseError::fail(format!(
                    "{wave:?} after the canary is not a zone wave"
                )));
            };
            prop_assert!(
                wave.instances
                    .iter()
                    .all(|id| targets.iter().any(|t| &t.id == id && &t.zone == zone))
            );
            let zone_size = targets.iter().filter(|target| &target.zone == zone).count() as u32;
            prop_assert!(wave.instances.len() as u32 <= options.batch.of(zone_size));
            if zones_seen.last() != Some(&zone) {
                prop_assert!(!zones_seen.contains(&zone), "zone {zone} comes back after another");
                zones_seen.push(zone);
                ids_by_zone.push(Vec::new());
            }
            ids_by_zone.last_mut().expect("pushed above").extend(&wave.instances);
        }
        // No zone wave is smaller than the batch and the floor require: one that is not its zone's
        // last is full, or the next target is healthy and the wave uses up the spare.
        let spare = healthy_total.saturating_sub(floor);
        for pair in zone_waves.windows(2).filter(|pair| pair[0].kind == pair[1].kind) {
            let zone_size = targets
                .iter()
                .filter(|target| WaveKind::Zone(target.zone.clone()) == pair[0].kind)
                .count();
            let full = pair[0].instances.len() as u32 == options.batch.of(zone_size as u32);
            let healthy_in_wave = pair[0].instances.iter().filter(|id| is_healthy(id)).count() as u32;
            let spare_used_up = is_healthy(&pair[1].instances[0]) && healthy_in_wave == spare;
            prop_assert!(full || spare_used_up, "{:?} closed early before {:?}", pair[0], pair[1]);
        }
        let mut expected_zones = zones_seen.clone();
        expected_zones.sort_by_key(|zone| (Some(*zone) != canary_zone.as_ref(), *zone));
        prop_assert_eq!(zones_seen, expected_zones);
        prop_assert!(ids_by_zone.iter().all(|ids| ids.is_sorted()), "a zone goes by id");
        Ok(())
    }

    /// Up to `MAX_ZONES` zones of up to `MAX_PER_ZONE` instances. Each zone draws how healthy it is
    /// (none, half or most of it), so that zones without a healthy target come up often. Ids start
    /// with a random tag, so that their order is unrelated to the zones'.
    fn any_stack() -> impl proptest::strategy::Strategy<Value = Vec<Candidate>> {
        // (tag, roll against the zone's healthy percentage, lost, pinned)
        let instance = (
            0u16..1000,
            0u8..100,
            proptest::bool::weighted(0.1),
            proptest::bool::weighted(0.15),
        );
        let healthy_percent = prop_oneof![Just(0u8), Just(50), Just(90)];
        let zone = (healthy_percent, proptest::collection::vec(instance, 0..=MAX_PER_ZONE));
        proptest::collection::vec(zone, 1..=MAX_ZONES).prop_map(|zones| {
            let mut instances = Vec::new();
            for (zone_index, (healthy_percent, members)) in zones.into_iter().enumerate() {
                for (tag, roll, lost, pinned) in members {
                    let health = if lost {
                        Health::Lost
                    } else if roll < healthy_percent {
                        Health::Healthy
                    } else if roll % 2 == 0 {
                        Health::Unhealthy
                    } else {
                        Health::Unknown
                    };
                    instances.push(Candidate {
                        id: format!("i{tag:03}-{:02}", instances.len()),
                        zone: format!("z{zone_index}"),
                        layer: "web".into(),
                        health,
                        pinned,
                    });
                }
            }
            instances
        })
    }

    fn any_strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
        let batch = prop_oneof![
            (1u32..=8).prop_map(Amount::Count),
            (1u8..=100).prop_map(Amount::Percent)
        ];
        let min_healthy = prop_oneof![
            (0u32..=40).prop_map(Amount::Count),
            (1u8..=100).prop_map(Amount::Percent)
        ];
        let rolling = (0u32..=4, batch, min_healthy).prop_map(|(canary, batch, min_healthy)| {
            Strategy::Rolling(RollingOptions {
                canary,
                batch,
                min_healthy,
            })
        });
        prop_oneof![1 => Just(Strategy::AllAtOnce), 4 => rolling]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Every target in exactly one wave, nothing lost or pinned, no empty wave, the canary
        /// first, zones grouped in order, and the floor held (or refused only when it must be).
        #[test]
        fn every_plan_follows_the_rules(instances in any_stack(), strategy in any_strategy()) {
            check_rules(&instances, &strategy, &plan(&instances, &strategy))?;
        }

        #[test]
        fn the_input_order_does_not_change_the_plan(
            (instances, shuffled) in any_stack().prop_flat_map(|stack| (Just(stack.clone()), Just(stack).prop_shuffle())),
            strategy in any_strategy(),
        ) {
            prop_assert_eq!(plan(&instances, &strategy), plan(&shuffled, &strategy));
        }

        #[test]
        fn an_amount_reads_back_what_it_displays(
            amount in prop_oneof![any::<u32>().prop_map(Amount::Count), (1u8..=100).prop_map(Amount::Percent)],
        ) {
            prop_assert_eq!(amount.to_string().parse::<Amount>(), Ok(amount));
        }
    }
}

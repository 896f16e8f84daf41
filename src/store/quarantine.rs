//! Quarantined change sets, as the store keeps them: which entities belong
//! to which quarantined set, what the database holds of them, and why they
//! were quarantined.
//!
//! A set stays whole: its members are written together or not at all. A
//! later change of any member brings the current state of every other member
//! into the same group (see `Store::apply`), and the set is resolved only
//! when that group commits.

use std::collections::HashMap;
use std::sync::Arc;

use crate::entity::KindId;
use crate::outbox::{EntityKey, Resolution, TicketError};

/// One quarantined entity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Member {
    /// The quarantine id of its set.
    pub(crate) set: u64,
    /// The version the database holds of it (0: no row).
    pub(crate) base: u64,
    /// Whether memory holds the quarantined state (false for a conflict
    /// loaded at start-up: memory holds what the database holds, and the
    /// quarantined state is only in the dead letter).
    pub(crate) holds: bool,
}

/// One quarantined change set.
pub(crate) struct QuarantineSet {
    pub(crate) members: Vec<EntityKey>,
    /// What a durable request touching it is answered with.
    pub(crate) error: TicketError,
    /// Set when an operator asked to replay or discard it: how its dead
    /// letters are marked when its members commit.
    pub(crate) resolution: Option<Resolution>,
}

/// Every quarantined set of the store.
#[derive(Default)]
pub(crate) struct QuarantineBook {
    sets: HashMap<u64, QuarantineSet>,
    member_of: HashMap<EntityKey, Member>,
}

impl QuarantineBook {
    /// Quarantined entities.
    pub(crate) fn entities(&self) -> usize {
        self.member_of.len()
    }

    /// The membership of entity `id` of `kind`, if it is quarantined. The
    /// id is cloned for the lookup only while something is quarantined:
    /// the change path asks for every entity it changes.
    pub(crate) fn member(&self, kind: KindId, id: &Arc<str>) -> Option<Member> {
        if self.member_of.is_empty() {
            return None;
        }
        self.member_of.get(&(kind, id.clone())).copied()
    }

    pub(crate) fn set(&self, id: u64) -> Option<&QuarantineSet> {
        self.sets.get(&id)
    }

    /// The set entity `id` of `kind` belongs to.
    pub(crate) fn set_of(&self, kind: KindId, id: &Arc<str>) -> Option<&QuarantineSet> {
        self.member(kind, id).and_then(|m| self.sets.get(&m.set))
    }

    /// How a committed write of entity `id` of `kind` resolves its dead
    /// letter, if it has one.
    pub(crate) fn resolution_of(&self, kind: KindId, id: &Arc<str>) -> Option<Resolution> {
        self.set_of(kind, id).map(|set| set.resolution.unwrap_or(Resolution::Superseded))
    }

    /// Records a quarantined set; its members leave the sets they were in.
    pub(crate) fn insert(&mut self, id: u64, members: Vec<(EntityKey, u64)>, error: TicketError, holds: bool) {
        for (key, _) in &members {
            self.leave(key);
        }
        for (key, base) in &members {
            self.member_of.insert(key.clone(), Member { set: id, base: *base, holds });
        }
        let members = members.into_iter().map(|(key, _)| key).collect();
        self.sets.insert(id, QuarantineSet { members, error, resolution: None });
    }

    /// `key` was written: it leaves its set (the set goes once empty).
    pub(crate) fn leave(&mut self, key: &EntityKey) {
        let Some(member) = self.member_of.remove(key) else { return };
        if let Some(set) = self.sets.get_mut(&member.set) {
            set.members.retain(|m| m != key);
            if set.members.is_empty() {
                self.sets.remove(&member.set);
            }
        }
    }

    /// Marks the set of `key` to be resolved as `resolution` when it
    /// commits.
    pub(crate) fn resolve_as(&mut self, key: &EntityKey, resolution: Resolution) {
        if let Some(member) = self.member(key.0, &key.1)
            && let Some(set) = self.sets.get_mut(&member.set)
        {
            set.resolution = Some(resolution);
        }
    }
}

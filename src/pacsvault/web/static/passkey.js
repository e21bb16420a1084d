// Passkeys (WebAuthn) for the second-factor and account pages. A static file: the
// Content-Security-Policy allows no inline script. The server's options come as JSON with
// binary fields in base64url; the browser's answers go back the same way.
"use strict";

(function () {
  function toBytes(value) {
    var b64 = value.replace(/-/g, "+").replace(/_/g, "/");
    b64 += "===".slice((b64.length + 3) % 4);
    var raw = atob(b64);
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { out[i] = raw.charCodeAt(i); }
    return out.buffer;
  }

  function toB64url(buffer) {
    var bytes = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < bytes.length; i++) { raw += String.fromCharCode(bytes[i]); }
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function csrf() {
    var field = document.querySelector('input[name="csrf"]');
    return field ? field.value : "";
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: {"Content-Type": "application/json", "Accept": "application/json",
                "X-CSRF-Token": csrf()},
      body: JSON.stringify(body || {})
    }).then(function (res) {
      return res.json().catch(function () { return {}; }).then(function (data) {
        if (!res.ok) {
          var err = new Error(data.error || ("HTTP " + res.status));
          err.next = data.next;
          throw err;
        }
        return data;
      });
    });
  }

  function show(message) {
    var box = document.getElementById("passkey-message");
    if (box) { box.textContent = message; box.hidden = false; }
  }

  function descriptors(list) {
    return (list || []).map(function (d) {
      return {type: d.type, id: toBytes(d.id), transports: d.transports};
    });
  }

  function credentialJson(cred) {
    var r = cred.response;
    var response = {clientDataJSON: toB64url(r.clientDataJSON)};
    if (r.attestationObject) {
      response.attestationObject = toB64url(r.attestationObject);
      if (r.getTransports) { response.transports = r.getTransports(); }
    } else {
      response.authenticatorData = toB64url(r.authenticatorData);
      response.signature = toB64url(r.signature);
      if (r.userHandle) { response.userHandle = toB64url(r.userHandle); }
    }
    return {id: cred.id, rawId: toB64url(cred.rawId), type: cred.type, response: response,
            clientExtensionResults: cred.getClientExtensionResults ?
              cred.getClientExtensionResults() : {}};
  }

  function signIn(button) {
    post(button.dataset.options).then(function (opts) {
      opts.challenge = toBytes(opts.challenge);
      opts.allowCredentials = descriptors(opts.allowCredentials);
      return navigator.credentials.get({publicKey: opts});
    }).then(function (cred) {
      return post(button.dataset.verify, {credential: credentialJson(cred)});
    }).then(function (data) {
      window.location.assign(data.next || "/account");
    }).catch(function (err) {
      show(err.message);
      if (err.next) { window.location.assign(err.next); }
    });
  }

  function register(button) {
    var label = document.getElementById("passkey-label");
    post(button.dataset.options).then(function (opts) {
      opts.challenge = toBytes(opts.challenge);
      opts.user.id = toBytes(opts.user.id);
      opts.excludeCredentials = descriptors(opts.excludeCredentials);
      return navigator.credentials.create({publicKey: opts});
    }).then(function (cred) {
      return post(button.dataset.verify, {credential: credentialJson(cred),
                                          label: label ? label.value : ""});
    }).then(function (data) {
      window.location.assign(data.next || "/account");
    }).catch(function (err) { show(err.message); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!window.PublicKeyCredential || !navigator.credentials) { return; }
    var get = document.getElementById("passkey-get");
    if (get) {
      document.getElementById("passkey-sign-in").hidden = false;
      get.addEventListener("click", function () { signIn(get); });
    }
    var create = document.getElementById("passkey-create");
    if (create) {
      document.getElementById("passkey-add").hidden = false;
      create.addEventListener("click", function () { register(create); });
    }
  });
})();
